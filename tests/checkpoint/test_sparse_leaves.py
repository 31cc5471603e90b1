"""Sparse COO tensors in checkpoints (format 5): SGD's momentum of sparse embeddings.

Saved as their rows and values, in their order (an uncoalesced tensor's order is the order its rows
are summed in), rebuilt with torch's invariant checks; through a managed directory, an async save
beside donated steps, and `fit` stopped and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.checkpoint.format import (
    MANIFEST,
    PLAIN_FORMAT_VERSION,
    SPARSE_FORMAT_VERSION,
    read_tree,
    write_tree,
)
from functrain.errors import CheckpointCorruptError
from tests.checkpoint.test_serialization import dump_manifest
from tests.comparisons import assert_trees_equal
from tests.optim import test_sparse as cases

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def uncoalesced() -> torch.Tensor:
    """Rows 3 and 1 twice, out of order: what a sparse embedding's gradients add up to."""
    indices = torch.tensor([[3, 1, 0, 3, 1]])
    values = torch.arange(10, dtype=torch.float32).reshape(5, 2) - 4.5
    return torch.sparse_coo_tensor(indices, values, (6, 2), check_invariants=True)


def test_a_sparse_tensor_round_trips_with_its_rows_in_order_as_format_5(tmp_path: Path) -> None:
    tree = {"buf": uncoalesced(), "coalesced": uncoalesced().coalesce(), "w": torch.ones(2)}
    path = write_tree(tmp_path / "ckpt", tree)
    loaded, manifest = read_tree(path)
    assert manifest["format_version"] == SPARSE_FORMAT_VERSION
    assert loaded["buf"].is_sparse and not loaded["buf"].is_coalesced()
    assert loaded["coalesced"].is_coalesced()
    assert_trees_equal(tree, loaded)
    dense = write_tree(tmp_path / "dense", {"w": torch.ones(2)})
    assert read_tree(dense)[1]["format_version"] == PLAIN_FORMAT_VERSION  # no sparse: as before


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda node: node.update(shape=[2, 2]), "malformed.*size is inconsistent"),
        (lambda node: node.update(coalesced=True), "malformed.*is_coalesced"),
        (lambda node: node.update(shape="6x2"), "malformed sparse tensor"),
        (lambda node: node.update(values=node["indices"]), "is named at"),
    ],
    ids=["index-outside-shape", "said-coalesced", "shape-not-a-list", "one-tensor-twice"],
)
def test_a_crafted_sparse_node_is_refused_as_corrupt(tmp_path: Path, edit: Any, words: str) -> None:
    path = write_tree(tmp_path / "ckpt", {"buf": uncoalesced()})
    manifest = json.loads((path / MANIFEST).read_bytes())
    edit(manifest["structure"]["dict"]["buf"]["sparse_coo"])
    (path / MANIFEST).write_bytes(dump_manifest(manifest))
    with pytest.raises(CheckpointCorruptError, match=words):
        read_tree(path)


def test_sparse_indices_of_another_dtype_are_refused_not_truncated(tmp_path: Path) -> None:
    """Float indices r + 0.7 loaded as row r."""
    sparse = uncoalesced()
    path = write_tree(tmp_path / "ckpt", {"buf": sparse, "f": sparse._indices().float() + 0.7})
    manifest = json.loads((path / MANIFEST).read_bytes())
    structure = manifest["structure"]["dict"]
    node = structure["buf"]["sparse_coo"]
    node["indices"], structure["f"]["tensor"] = structure["f"]["tensor"], node["indices"]
    (path / MANIFEST).write_bytes(dump_manifest(manifest))
    with pytest.raises(
        CheckpointCorruptError,
        match=r"the sparse tensor at 'buf' has indices of torch.float32; the format holds them as "
        r"torch.int64",
    ):
        read_tree(path)


def momentum_state(loss_fn: Any = cases.loss_fn) -> ft.TrainState:
    return ft.TrainState.create(
        cases.model(True), ft.sgd(0.2, momentum=0.9), loss_fn, accumulate_steps=2
    )


def flat_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    items, users, labels = batch
    return cases.loss_fn(model, ((items, users), labels))


def test_an_async_save_of_sparse_momentum_beside_donated_steps_holds_the_state_saved(
    tmp_path: Path,
) -> None:
    state, data = momentum_state(), cases.batches(8)
    for batch in data[:3]:  # mid-window: the gradient sums are sparse too
        state, _ = ft.train_step(state, batch)
    at_save = state.clone()
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        path = mgr.save(state)
        for batch in data[3:]:  # donated steps grow the buffers in place meanwhile
            state, _ = ft.train_step(state, batch, donate=True)
        mgr.wait()
    loaded = ft.load(path, like=momentum_state())
    assert ft.diff_states(at_save, loaded) == []
    assert loaded.opt_state.inner.inner.momentum[0].is_sparse


def test_fit_stopped_and_resumed_with_sparse_momentum_equals_the_run_never_stopped(
    tmp_path: Path,
) -> None:
    gen = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 40, (48, 4), generator=gen),
        torch.randint(0, 30, (48, 3), generator=gen),
        torch.randint(0, 3, (48,), generator=gen),
    )

    def run(directory: Path, max_steps: int | None, resume: bool = False) -> ft.TrainState:
        start = momentum_state(flat_loss)
        if resume:  # weights the resumed run must not train from: it takes the checkpoint's
            start = ft.TrainState.replace(start, params={k: v + 1 for k, v in start.params.items()})
        return ft.fit(
            start,
            data,
            batch_size=8,
            max_epochs=2,
            max_steps=max_steps,
            checkpoint_dir=directory,
            resume=resume,
            progress=False,
            verbosity="silent",
        ).state

    whole = run(tmp_path / "whole", None)
    cut = run(tmp_path / "cut", 5)  # stops mid-epoch, the buffers sparse
    assert cut.opt_state.inner.inner.momentum[0].is_sparse
    resumed = run(tmp_path / "cut", None, resume=True)
    assert int(resumed.step) == int(whole.step) == 6  # 12 batches, windows of 2
    assert_trees_equal(whole.tree(), resumed.tree(), ignore=["driver"])


@pytest.mark.parametrize(
    ("where", "sparse_model"),
    [("params", True), ("opt_state", False), ("opt_state", True)],
    ids=[
        "a-parameter",
        "the-optimizer-state-of-a-dense-model",
        "the-optimizer-state-of-a-dense-parameter-beside-sparse-ones",
    ],
)
def test_a_sparse_tensor_where_the_state_holds_a_dense_one_is_refused(
    tmp_path: Path, where: str, sparse_model: bool
) -> None:
    from functrain.checkpoint.state_io import fingerprint
    from functrain.errors import StateMismatchError

    model = cases.model(True) if sparse_model else torch.nn.Linear(6, 3)
    state = ft.TrainState.create(model, ft.sgd(0.2, momentum=0.9), cases.loss_fn)
    tree = dict(state.tree())
    if where == "params":
        weight = state.params["head.weight"]
        tree["params"] = {**state.params, "head.weight": weight.to_sparse()}
    else:
        inner = tree["opt_state"].inner
        k = list(state.params).index("head.weight") if sparse_model else 0  # a dense parameter's
        # (a sparse model trains with the sparse SGD, whose state has a field per moment; the
        # fused SGD's keeps them by name)
        held = inner._asdict() if sparse_model else inner.slots
        momentum = list(held["momentum"])
        momentum[k] = torch.zeros(momentum[k].shape).to_sparse()
        changed = {**held, "momentum": tuple(momentum)}
        inner = inner._replace(**changed) if sparse_model else inner._replace(slots=changed)
        tree["opt_state"] = tree["opt_state"]._replace(inner=inner)
    path = write_tree(tmp_path / "ckpt", tree, fingerprint=fingerprint(state))
    at = "momentum" if sparse_model else "slots/momentum"
    leaf = "params/head.weight" if where == "params" else f"opt_state/inner/{at}/{k}"
    with pytest.raises(
        StateMismatchError, match=f"{leaf}: expected a dense tensor, got a sparse one"
    ):
        ft.load(path, like=state)


class _CsrBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("adjacency", torch.eye(4).to_sparse_csr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.sparse.mm(self.adjacency, x.T).T)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_sparse_layout_no_checkpoint_holds_is_refused_naming_it(tmp_path: Path) -> None:
    # a CSR buffer (a graph's adjacency) has no storage to hold during the save, nor a format
    state = ft.TrainState.create(_CsrBuffer(), ft.adam(1e-2), lambda m, b: m(b).sum())
    with pytest.raises(ft.CheckpointError, match=r"'buffers/adjacency': torch.float32 torch.sp"):
        ft.save(state, tmp_path / "csr")
    assert not any(tmp_path.iterdir())
