"""Sparse gradients (``nn.Embedding(sparse=True)``) train as under torch.optim, or are refused.

`sgd` (with and without momentum), `adagrad` and `sparse_adam` (beside a dense optimizer through
`partition`) against ``torch.optim.SGD``, ``Adagrad`` and ``SparseAdam`` + ``Adam``, bit for bit:
the pure step (its input untouched, also by later donated steps on its result), the donated step,
gradient accumulation, `fit`, and a run saved and resumed. Everything torch has
no sparse path for is refused by `TrainState.create`, naming the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal

STEPS = 5


class Recommender(nn.Module):
    """A sparse embedding and a sparse embedding bag (tied to nothing), and a dense head."""

    def __init__(self, bag: bool = False) -> None:
        super().__init__()
        self.items = nn.Embedding(40, 6, sparse=True)
        self.users = nn.EmbeddingBag(30, 6, mode="sum", sparse=True) if bag else None
        self.head = nn.Linear(6, 3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        items, users = batch
        h = self.items(items).mean(1)
        if self.users is not None:
            h = h + self.users(users)
        return self.head(torch.tanh(h))


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    (items, users), labels = batch
    return F.cross_entropy(model((items, users)), labels)


def batches(n: int = STEPS) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        items = torch.randint(0, 40, (8, 4), generator=gen)  # rows repeat: uncoalesced gradients
        users = torch.randint(0, 30, (8, 3), generator=gen)
        out.append(((items, users), torch.randint(0, 3, (8,), generator=gen)))
    return out


def model(bag: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Recommender(bag)


def rows(name: str, p: torch.Tensor) -> str:
    return "rows" if name.startswith(("items.", "users.")) else "dense"


# name: (functrain optimizer, torch optimizers over the reference module)
OPTIMIZERS: dict[str, tuple[Callable[[], ft.Transform], Callable[[nn.Module], list[Any]]]] = {
    "sgd": (lambda: ft.sgd(0.2), lambda m: [torch.optim.SGD(m.parameters(), 0.2)]),
    "sgd-maximize": (
        lambda: ft.sgd(0.2, maximize=True),
        lambda m: [torch.optim.SGD(m.parameters(), 0.2, maximize=True)],
    ),
    "sgd-momentum": (
        lambda: ft.sgd(0.2, momentum=0.9),
        lambda m: [torch.optim.SGD(m.parameters(), 0.2, momentum=0.9)],
    ),
    "sgd-nesterov": (
        lambda: ft.sgd(0.2, momentum=0.8, nesterov=True, maximize=True),
        lambda m: [
            torch.optim.SGD(m.parameters(), 0.2, momentum=0.8, nesterov=True, maximize=True)
        ],
    ),
    "sgd-dampening": (
        lambda: ft.sgd(0.2, momentum=0.9, dampening=0.3),
        lambda m: [torch.optim.SGD(m.parameters(), 0.2, momentum=0.9, dampening=0.3)],
    ),
    "adagrad": (
        lambda: ft.adagrad(0.1, lr_decay=0.05, initial_accumulator_value=0.1),
        lambda m: [
            torch.optim.Adagrad(m.parameters(), 0.1, lr_decay=0.05, initial_accumulator_value=0.1)
        ],
    ),
    "sparse_adam+adam": (
        lambda: ft.partition(rows, rows=ft.sparse_adam(0.01), dense=ft.adam(0.01, fused=False)),
        lambda m: [
            torch.optim.SparseAdam(
                [p for n, p in m.named_parameters() if rows(n, p) == "rows"], 0.01
            ),
            torch.optim.Adam([p for n, p in m.named_parameters() if rows(n, p) == "dense"], 0.01),
        ],
    ),
}


def torch_run(name: str, bag: bool, n: int = STEPS) -> nn.Module:
    ref = model(bag)
    opts = OPTIMIZERS[name][1](ref)
    for batch in batches(n):
        loss_fn(ref, batch).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return ref


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in module.named_parameters()}


def create(name: str, bag: bool, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(model(bag), OPTIMIZERS[name][0](), loss_fn, **options)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "embedding-and-bag"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_gradients_train_as_under_torch_optim(name: str, donate: bool, bag: bool) -> None:
    state = create(name, bag, grad_norm=True)
    for batch in batches():
        before = None if donate else state.clone()
        given = state
        state, metrics = ft.train_step(state, batch, donate=donate)
        assert torch.isfinite(metrics["grad_norm"])
        if before is not None:
            assert ft.diff_states(before, given) == []
    assert_trees_equal(params_of(torch_run(name, bag)), dict(state.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_sparse_run_saved_and_resumed_equals_the_run_never_stopped(
    name: str, tmp_path: Path
) -> None:
    state = create(name, True)
    data = batches()
    for batch in data[:2]:
        state, _ = ft.train_step(state, batch)
    resumed = ft.load(ft.save(state, tmp_path / "ckpt"), like=create(name, True))
    for batch in data[2:]:
        state, _ = ft.train_step(state, batch, donate=True)
        resumed, _ = ft.train_step(resumed, batch, donate=True)
    assert_trees_equal(state.tree(), resumed.tree())
    assert_trees_equal(params_of(torch_run(name, True)), dict(resumed.params))


def torch_micro_step(
    ref: nn.Module, opts: list[Any], batch: Any, i: int, every: int, convention: str = "loss"
) -> None:
    """Batch `i` of the torch loop that accumulates `every` batches' gradients in ``.grad``, then
    steps: on the gradients of ``loss / every`` (``"loss"``, as Lightning), or on the sum of the
    loss's divided by the window (``"mean"``: ``grad.div_(every)``)."""
    loss = loss_fn(ref, batch)
    (loss / every if convention == "loss" and every > 1 else loss).backward()
    if (i + 1) % every:
        return
    if convention == "mean":
        for p in ref.parameters():
            if p.grad is not None:
                p.grad.div_(every)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def torch_accumulated(name: str, every: int, n: int, convention: str = "loss") -> nn.Module:
    """`torch_micro_step` over `n` batches of `batches`."""
    ref = model(True)
    opts = OPTIMIZERS[name][1](ref)
    for i, batch in enumerate(batches(n)):
        torch_micro_step(ref, opts, batch, i, every, convention)
    return ref


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("convention", ["loss", "mean"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulated_sparse_gradients_train_as_the_torch_loop(
    name: str, donate: bool, convention: str
) -> None:
    options: dict[str, Any] = {"accumulate_steps": 3}
    if convention != "loss":  # the default
        options["accumulate_convention"] = convention
    state = ft.TrainState.create(model(True), OPTIMIZERS[name][0](), loss_fn, **options)
    for batch in batches(6):
        before = None if donate else state.clone()
        given = state
        state, _ = ft.train_step(state, batch, donate=donate)
        if before is not None:
            assert ft.diff_states(before, given) == []
    assert int(state.step) == 2
    assert_trees_equal(params_of(torch_accumulated(name, 3, 6, convention)), dict(state.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("at", [1, 3, 4])
def test_an_accumulating_sparse_run_resumed_mid_window_equals_the_run_never_stopped(
    at: int, tmp_path: Path
) -> None:
    def create_one() -> ft.TrainState:
        opt = OPTIMIZERS["sgd-momentum"][0]()
        return ft.TrainState.create(model(True), opt, loss_fn, accumulate_steps=3)

    state, data = create_one(), batches(9)
    for batch in data[:at]:
        state, _ = ft.train_step(state, batch)
    resumed = ft.load(ft.save(state, tmp_path / "ckpt"), like=create_one())
    assert ft.diff_states(state, resumed) == []
    for batch in data[at:]:
        state, _ = ft.train_step(state, batch, donate=True)
        resumed, _ = ft.train_step(resumed, batch, donate=True)
    assert_trees_equal(state.tree(), resumed.tree())
    assert_trees_equal(params_of(torch_accumulated("sgd-momentum", 3, 9)), dict(resumed.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_fit_trains_a_sparse_model_as_torch() -> None:
    state = create("adagrad", True)
    result = ft.fit(
        state, batches(), max_epochs=1, shuffle=False, progress=False, verbosity="silent"
    )
    assert int(result.state.step) == STEPS
    assert_trees_equal(params_of(torch_run("adagrad", True)), dict(result.state.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_non_finite_sparse_step_is_skipped_leaving_everything_as_it_was(
    name: str, donate: bool
) -> None:
    state = create(name, False)
    data = batches()
    state, _ = ft.train_step(state, data[0])
    kept = state.clone()

    def poisoned(m: nn.Module, batch: Any) -> torch.Tensor:
        return loss_fn(m, batch) * float("nan")

    bad = ft.TrainState.replace(state, loss_fn=poisoned)
    after, metrics = ft.train_step(bad, data[1], donate=donate)
    assert float(metrics["skipped"]) == 1.0
    assert_trees_equal(kept.params, after.params)
    assert_trees_equal(kept.opt_state.inner, after.opt_state.inner)


def test_sparse_adam_refuses_dense_gradients_naming_partition() -> None:
    with pytest.raises(ConfigError, match="sparse gradients only.*partition") as refused:
        state = ft.TrainState.create(model(), ft.sparse_adam(0.01), loss_fn)
        ft.train_step(state, batches()[0])
    # the partition it writes is one that runs
    written = str(refused.value).split("dense optimizer: ")[1].replace("<the embedding>", "items")
    written = written.replace("(...)", "(0.01)")
    tx = eval(written, {"functrain": ft})
    ft.train_step(ft.TrainState.create(model(), tx, loss_fn), batches()[0])


@pytest.mark.parametrize(
    ("optimizer", "options", "words"),
    [
        (lambda: ft.sgd(0.1, weight_decay=0.01), {}, "sgd with weight_decay.*weight_decay=0"),
        (lambda: ft.adagrad(0.1, weight_decay=0.01), {}, "adagrad with weight_decay"),
        (lambda: ft.adamw(1e-3), {}, r"adamw\(.*cannot take the sparse gradients of items.weight"),
        (lambda: ft.rmsprop(1e-3), {}, "with SGD, Adagrad and SparseAdam"),
        (lambda: ft.sgd(0.1), {"clip_grad_norm": 1.0}, "clip_grad_norm with the sparse"),
        (lambda: ft.adagrad(0.1), {"precision": "fp16"}, r"precision='fp16'.*GradScaler"),
        (lambda: ft.adagrad(0.1), {"grad_stats": "layer"}, "grad_stats with the sparse"),
    ],
)
def test_what_torch_cannot_train_sparse_is_refused_at_create(
    optimizer: Callable[[], ft.Transform], options: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        ft.TrainState.create(model(), optimizer(), loss_fn, **options)


def test_data_parallel_training_of_sparse_gradients_is_refused_at_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # two ranks, as a launch would make them (the refusal comes before any collective)
    from functrain.core import create as create_module
    from functrain.distributed import DistConfig

    monkeypatch.setattr(create_module, "current_config", lambda *a: DistConfig(2, 0, None))
    with pytest.raises(ConfigError, match="data parallel training.*of 2 ranks.*sparse=False"):
        ft.TrainState.create(model(), ft.sgd(0.1), loss_fn)


def test_a_dense_model_keeps_the_fused_optimizer() -> None:
    dense = nn.Linear(3, 2)
    state = ft.TrainState.create(dense, ft.sgd(0.1), lambda m, b: m(b).sum())
    assert type(state.opt_state).__name__ != "SparseSgdState"
    sparse = ft.TrainState.create(model(), ft.sgd(0.1), loss_fn)
    assert type(sparse.opt_state.inner).__name__ == "SparseSgdState"
    assert "inner=sgd(lr=0.1," in sparse.tx.name  # the name the user gave, in its checkpoints


def test_a_copy_of_the_model_the_state_trains_stays_untouched() -> None:
    net = model(True)
    ref = copy.deepcopy(net)
    state = ft.TrainState.create(net, ft.sgd(0.1), loss_fn)
    ft.train_step(state, batches()[0], donate=True)
    assert_trees_equal(params_of(ref), params_of(net))


def test_stack_refuses_sparse_members_naming_the_way_out() -> None:
    members = [create("sgd", False), create("sgd", False)]
    with pytest.raises(ConfigError, match="stack cannot batch the sparse gradients of items"):
        ft.stack(members)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_torch_run_with_sparse_embeddings_continues_in_functrain_and_back(name: str) -> None:
    ref = model(True)
    opts = OPTIMIZERS[name][1](ref)
    data = batches(6)

    def torch_step(batch: Any) -> None:
        loss_fn(ref, batch).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for batch in data[:2]:
        torch_step(batch)
    run = ft.from_torch_optimizer(opts if len(opts) > 1 else opts[0], ref)
    state = run.create_state(copy.deepcopy(ref), loss_fn)
    for batch in data[2:4]:
        torch_step(batch)
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(params_of(ref), dict(state.params))
    # and back: torch continues the functrain state
    back = state.export_module().train()
    again = OPTIMIZERS[name][1](back)
    exported = ft.to_torch_state_dict(state, again if len(again) > 1 else again[0], back)
    for opt, saved in zip(again, exported if len(again) > 1 else [exported], strict=True):
        opt.load_state_dict(saved)
    for batch in data[4:]:
        torch_step(batch)
        loss_fn(back, batch).backward()
        for opt in again:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_trees_equal(params_of(ref), params_of(back))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_a_sparse_gradient_the_optimizer_cannot_take_is_refused_leaving_the_state() -> None:
    # the embeddings routed to a dense group of a partition by mistake
    tx = ft.partition(
        lambda name, p: "rows" if name.startswith("users.") else "dense",
        rows=ft.sparse_adam(0.01),
        dense=ft.adam(0.01),
    )
    state = ft.TrainState.create(model(True), tx, loss_fn)
    before = state.clone()
    with pytest.raises(ConfigError, match="cannot take the sparse gradients of items.weight"):
        ft.train_step(state, batches()[0])
    assert ft.diff_states(before, state) == []


def test_a_frozen_sparse_embedding_is_no_sparse_gradient_and_refuses_nothing() -> None:
    net = model(True)
    net.items.requires_grad_(False)
    state = ft.TrainState.create(
        net, ft.adamw(1e-2), loss_fn, trainable=lambda name, p: not name.startswith("users.")
    )
    assert set(state.params) == {"head.weight", "head.bias"}
    state, _ = ft.train_step(state, batches()[0])
    ft.stack([state, state.clone()])  # nor does stacking


def test_compile_step_refuses_sparse_gradients_naming_train_step() -> None:
    state = create("sgd", False)
    with pytest.raises(ConfigError, match="sparse gradients of items.weight.*functrain.train_step"):
        ft.compile_step(backend="eager")(state, batches()[0])


def test_an_error_of_the_update_that_is_not_about_sparsity_comes_out_as_it_is() -> None:
    def rate(count: torch.Tensor) -> torch.Tensor:
        if int(count) == 1:
            raise torch.OutOfMemoryError("out of memory (a stand-in)")
        return torch.tensor(0.1, dtype=torch.float64)

    state = ft.TrainState.create(model(), ft.sgd(rate), loss_fn)
    state, _ = ft.train_step(state, batches()[0])
    with pytest.raises(torch.OutOfMemoryError):
        ft.train_step(state, batches()[1])


class TwoTables(nn.Module):
    """Two sparse tables; a batch may leave the second out (an optional feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.items = nn.Embedding(40, 6, sparse=True)
        self.extra = nn.Embedding(30, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        items, extra = batch
        h = self.items(items).mean(1)
        if extra is not None:
            h = h + self.extra(extra).mean(1)
        return self.head(torch.tanh(h))


def two_table_batches() -> list[Any]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(STEPS + 1):
        items = torch.randint(0, 40, (8, 4), generator=gen)
        extra = torch.randint(0, 30, (8, 2), generator=gen) if i % 2 else None
        out.append(((items, extra), torch.randint(0, 3, (8,), generator=gen)))
    return out


def parts(m: nn.Module, label: str) -> list[torch.Tensor]:
    return [p for n, p in m.named_parameters() if (n.startswith("head.")) == (label == "dense")]


def head_or_rows(name: str, p: torch.Tensor) -> str:
    return "dense" if name.startswith("head.") else "rows"


TWO_TABLES: dict[str, Any] = {
    "sgd": (lambda: ft.sgd(0.2), lambda m: [torch.optim.SGD(m.parameters(), 0.2)]),
    "sgd-momentum": (
        lambda: ft.sgd(0.2, momentum=0.9, nesterov=True),
        lambda m: [torch.optim.SGD(m.parameters(), 0.2, momentum=0.9, nesterov=True)],
    ),
    "adagrad-lr-decay": (
        lambda: ft.adagrad(0.1, lr_decay=0.1),
        lambda m: [torch.optim.Adagrad(m.parameters(), 0.1, lr_decay=0.1)],
    ),
    "sparse_adam+adam": (
        lambda: ft.partition(
            head_or_rows, rows=ft.sparse_adam(0.01), dense=ft.adam(0.01, fused=False)
        ),
        lambda m: [
            torch.optim.SparseAdam(parts(m, "rows"), 0.01),
            torch.optim.Adam(parts(m, "dense"), 0.01),
        ],
    ),
    "sgd-momentum+adam": (
        lambda: ft.partition(
            head_or_rows, rows=ft.sgd(0.2, momentum=0.9), dense=ft.adam(0.01, fused=False)
        ),
        lambda m: [
            torch.optim.SGD(parts(m, "rows"), 0.2, momentum=0.9),
            torch.optim.Adam(parts(m, "dense"), 0.01),
        ],
    ),
}


def assert_trains_as_torch(name: str, net: nn.Module, data: list[Any], every: int) -> None:
    """`TWO_TABLES[name]` on `net` over `data` (windows of `every` batches, every third step
    donated), bit for bit with its torch optimizers."""
    make_ft, make_torch = TWO_TABLES[name]
    ref = copy.deepcopy(net)
    opts = make_torch(ref)
    state = ft.TrainState.create(net, make_ft(), loss_fn, accumulate_steps=every)
    for i, batch in enumerate(data):
        state, _ = ft.train_step(state, batch, donate=i % 3 == 0)
        torch_micro_step(ref, opts, batch, i, every)
    assert_trees_equal(params_of(ref), dict(state.params))


def padding_at(steps: tuple[int, ...]) -> list[Any]:
    """`two_table_batches` twice, the second table looking up only its padding at `steps`."""
    return [
        ((items, torch.zeros_like(items[:, :2]) if i in steps else extra), labels)
        for i, ((items, extra), labels) in enumerate(two_table_batches() * 2)
    ]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(TWO_TABLES), ids=lambda n: n.replace("+", "-"))
@pytest.mark.parametrize("every", [1, 2])
def test_a_sparse_table_unused_in_a_step_is_skipped_as_torch_skips_it(
    name: str, every: int
) -> None:
    torch.manual_seed(0)
    assert_trains_as_torch(name, TwoTables(), two_table_batches() * 2, every)


class Padded(TwoTables):
    """`TwoTables` whose second table has a padding row: a batch of padding alone gives it a
    gradient without rows, which torch.optim steps (not a None gradient, which it skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Embedding(30, 6, padding_idx=0, sparse=True)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(TWO_TABLES), ids=lambda n: n.replace("+", "-"))
@pytest.mark.parametrize("every", [1, 2])
def test_a_sparse_table_whose_batch_is_all_padding_steps_as_torch_steps_it(
    name: str, every: int
) -> None:
    torch.manual_seed(0)
    assert_trains_as_torch(name, Padded(), padding_at((2, 3, 4)), every)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", ["adagrad-lr-decay", "sparse_adam+adam"])
def test_a_torch_run_whose_tables_took_different_steps_continues_in_functrain(name: str) -> None:
    # the second table sat out some steps: torch counts each table's own step
    make_torch = TWO_TABLES[name][1]
    torch.manual_seed(0)
    ref = TwoTables()
    opts = make_torch(ref)
    data = two_table_batches() * 2
    for i, batch in enumerate(data):
        torch_micro_step(ref, opts, batch, i, 1)
        if i == 2:
            run = ft.from_torch_optimizer(opts if len(opts) > 1 else opts[0], ref)
            state = run.create_state(copy.deepcopy(ref), loss_fn)
        elif i > 2:
            state, _ = ft.train_step(state, batch)
    assert_trees_equal(params_of(ref), dict(state.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(TWO_TABLES), ids=lambda n: n.replace("+", "-"))
def test_a_window_that_leaves_a_table_out_then_looks_up_its_padding_steps_it_as_torch(
    name: str,
) -> None:
    # torch's .grad after the window is the padding batch's gradient without rows: stepped;
    # windows (left out, padding) twice, then the table looked up
    torch.manual_seed(0)
    assert_trains_as_torch(name, Padded(), padding_at((1, 3)), 2)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_a_torch_sparse_adam_run_converts_before_a_table_was_looked_up() -> None:
    # the second table (an optional feature) has no state in torch yet: it goes on from step 0
    make_torch = TWO_TABLES["sparse_adam+adam"][1]
    torch.manual_seed(0)
    ref = TwoTables()
    opts = make_torch(ref)
    data = two_table_batches()
    data = [((items, None), y) for (items, _), y in data[:3]] + data[3:]
    for i, batch in enumerate(data):
        torch_micro_step(ref, opts, batch, i, 1)
        if i == 1:
            assert ref.extra.weight not in opts[0].state  # (not looked up yet)
            state = ft.from_torch_optimizer(opts, ref).create_state(copy.deepcopy(ref), loss_fn)
        elif i > 1:
            state, _ = ft.train_step(state, batch)
    assert_trees_equal(params_of(ref), dict(state.params))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", list(TWO_TABLES), ids=lambda n: n.replace("+", "-"))
@pytest.mark.parametrize("case", ["skipped", "mid-window", "table-unused"])
def test_a_pure_step_shares_no_tensor_a_later_donated_step_writes(name: str, case: str) -> None:
    # the state a pure step returns, stepped with donate=True, leaves the step's input as it was
    torch.manual_seed(0)
    every = 2 if case == "mid-window" else 1
    state = ft.TrainState.create(
        TwoTables(), TWO_TABLES[name][0](), loss_fn, accumulate_steps=every
    )
    data = two_table_batches()
    for batch in data[:4]:
        state, _ = ft.train_step(state, batch)
    pure_batch = data[4] if case == "table-unused" else data[5]  # batch 4 leaves "extra" out
    if case == "skipped":
        state = ft.TrainState.replace(state, loss_fn=lambda m, b: loss_fn(m, b) * float("nan"))
    kept = state.clone()
    new, _ = ft.train_step(state, pure_batch)
    new = ft.TrainState.replace(new, loss_fn=loss_fn)
    for batch in data[1:4]:
        new, _ = ft.train_step(new, batch, donate=True)
    assert ft.diff_states(kept, state) == []


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_a_torch_sgd_run_whose_table_has_no_momentum_buffer_yet_continues_in_functrain() -> None:
    torch.manual_seed(0)
    ref = TwoTables()
    (opt,) = TWO_TABLES["sgd-momentum"][1](ref)
    data = two_table_batches()

    def torch_step(module: nn.Module, optimizer: Any, batch: Any) -> None:
        loss_fn(module, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch_step(ref, opt, data[0])  # leaves the "extra" table out: torch has no buffer for it
    assert "momentum_buffer" not in opt.state[ref.extra.weight]
    state = ft.from_torch_optimizer(opt, ref).create_state(copy.deepcopy(ref), loss_fn)
    made = dict(zip(state.params, state.opt_state.inner.made, strict=True))
    assert not bool(made["extra.weight"]) and bool(made["items.weight"])
    back = copy.deepcopy(ref)
    (again,) = TWO_TABLES["sgd-momentum"][1](back)
    again.load_state_dict(ft.to_torch_state_dict(state, again, back))
    assert "momentum_buffer" not in again.state[back.extra.weight]  # and none on the way back
    for batch in data[1:]:
        torch_step(ref, opt, batch)
        torch_step(back, again, batch)
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(params_of(ref), dict(state.params))
    assert_trees_equal(params_of(ref), params_of(back))


def test_a_dense_sgd_run_whose_parameter_has_no_momentum_buffer_yet_continues() -> None:
    # as a table not looked up: the head torch has no buffer for starts one at its first
    # gradient (undampened), and sits out the steps without one
    def run() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
        return net, torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, dampening=0.5)

    def loss(m: Any, b: Any) -> torch.Tensor:
        return sum((m[k](b[0]).pow(2).sum() for k in b[1]), torch.zeros(()))

    heads = [("used",), ("used",), ("used", "unused")]
    data = [(torch.full((4, 3), float(i + 1)), keys) for i, keys in enumerate(heads)]
    net, opt = run()
    expected, expected_opt = run()
    for i, batch in enumerate(data):
        for module, optimizer in [(expected, expected_opt)] + [(net, opt)] * (i == 0):
            optimizer.zero_grad()
            loss(module, batch).backward()
            optimizer.step()
    state = ft.from_torch_optimizer(opt, net).create_state(net, loss)
    for batch in data[1:]:
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(params_of(expected), dict(state.params))
