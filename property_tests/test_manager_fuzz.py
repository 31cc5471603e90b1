"""Fuzz: whatever bytes the `latest` pointer holds, readers name only committed checkpoints.

No checksum covers `latest` (it is one name, replaced atomically), so a reader must treat it as
untrusted: read it bounded, accept only a checkpoint's name, and otherwise fall back to scanning
the directory. The oracle is exact: `latest()` follows the pointer when its bytes are a committed
checkpoint's name (and an optional newline) and names the newest regular checkpoint otherwise;
`restore_latest()` loads the newest that loads, or the best one the pointer names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import functrain as ft
from tests.models import square_output_loss as loss_fn

REGULAR = [f"ckpt-{i:09d}-{i:09d}" for i in (1, 2, 3)]
BESTS = ["best-000000001-000000001"]
UNCOMMITTED = "ckpt-000000099-000000099"  # a directory without a manifest: never committed
NAMES = [
    *REGULAR,
    *BESTS,
    UNCOMMITTED,
    "ckpt-000000004-000000004",
    "best-000000003-000000003",
    "latest",
    "writer.lock",
]


def template() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Linear(3, 2)
    return ft.TrainState.create(module, ft.sgd(0.1), loss_fn)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("run")
    state = template()
    with ft.CheckpointManager(directory, best_metric="loss") as writer:
        for i, loss in zip((1, 2, 3), (0.1, 0.5, 0.7)):
            state = state.replace(step=torch.tensor(i), epoch_step=torch.tensor(i))
            writer.save(state, metrics={"loss": loss})
    (directory / UNCOMMITTED).mkdir()
    assert [p.name for p in ft.CheckpointManager(directory, readonly=True).all()] == REGULAR
    yield directory


def spliced(parts: tuple[str, bytes, int]) -> bytes:
    name, noise, where = parts
    raw = name.encode()
    where %= len(raw) + 1
    return raw[:where] + noise + raw[where:]


POINTERS = st.one_of(
    st.binary(max_size=600),
    st.sampled_from(NAMES).map(str.encode),
    st.sampled_from(NAMES).map(lambda n: n.encode() + b"\n"),
    st.tuples(st.sampled_from(NAMES), st.binary(min_size=1, max_size=40), st.integers(0, 40)).map(
        spliced
    ),
    st.tuples(st.sampled_from(NAMES), st.integers(1, 8_000_000)).map(
        lambda t: t[0].encode() + b"\n" * t[1]
    ),
    st.builds(lambda n: b"\x80" * n, st.integers(200, 8_000_000)),
)


def expected_latest(raw: bytes) -> str:
    name = raw.removesuffix(b"\n")
    committed = [n.encode() for n in [*REGULAR, *BESTS]]
    return name.decode() if len(raw) <= 256 and name in committed else REGULAR[-1]


@given(raw=POINTERS)
def test_readers_follow_only_a_pointer_to_a_committed_checkpoint(run: Path, raw: bytes) -> None:
    (run / "latest").write_bytes(raw)
    reader = ft.CheckpointManager(run, readonly=True, best_metric="loss")
    want = expected_latest(raw)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        latest = reader.latest()
        restored = reader.restore_latest(like=template())
    assert latest == run / want
    # restoring goes by name, newest first; a pointer to a best one (not among those) goes first
    restored_from = want if want.startswith("best-") else REGULAR[-1]
    assert restored is not None and int(restored.step) == int(restored_from.split("-")[1])
    assert all(issubclass(w.category, RuntimeWarning) for w in seen), [str(w.message) for w in seen]
    # the uncommitted newest is skipped with a warning unless the pointer named a best checkpoint
    assert any(UNCOMMITTED in str(w.message) for w in seen) == (not want.startswith("best-"))
