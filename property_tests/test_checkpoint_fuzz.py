"""Fuzzing the bytes of every file of a checkpoint: a load raises a `FunctrainError` or succeeds.

Each example takes a real checkpoint of a `TrainState` (several dtypes, optimizer state, driver
records), picks one of its files (the manifest or the tensor file) and changes its bytes: flips,
overwrites, inserts, deletes, truncates or extends. Most examples then re-seal what they changed
(the tensor file's digest and size recorded anew, the manifest's own digest recomputed), as an
attacker can: a checksum is not a signature, and only a re-sealed edit reaches the parsers and
checks behind the digests. Every load must end in bounded time and memory, with success or a
`FunctrainError`; anything else (a raw `TypeError`, `RuntimeError`, a hang, a huge allocation)
fails.

The "ci" profile runs 60 examples; ``HYPOTHESIS_PROFILE=long`` runs ten thousand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import functrain as ft
from functrain.checkpoint import format as ser
from functrain.errors import FunctrainError

EXAMPLES = 10_000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 60
SECONDS_PER_EXAMPLE = 10.0
MIB_PER_EXAMPLE = (
    256  # the checkpoint is 10 KiB: a crafted one may cost some, never hundreds of MiB
)
MANIFEST = "manifest.json"
TENSORS = "tensors-00000.safetensors"
SEAL = b'{\n  "manifest_blake3": "'


def template() -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(torch.bfloat16)
    return ft.TrainState.create(
        model, ft.adamw(1e-2), lambda m, b: m(b).float().square().mean(), ema_decay=0.9
    )


@pytest.fixture(scope="module")
def reference() -> Iterator[Path]:
    state = template()
    state, _ = ft.train_step(state, torch.randn(16, 4, dtype=torch.bfloat16))
    driver = {
        "history": {"train": [{"step": 1, "loss": 0.5}], "eval": [], "epoch": []},
        "empty_batches": 0,
        "stop_reason": None,
    }
    with tempfile.TemporaryDirectory(prefix="ft-fuzz-") as d:
        yield ft.save(state.replace(driver=driver), Path(d) / "ckpt", metadata={"note": "fuzz"})


def reseal_manifest(raw: bytes) -> bytes:
    """The manifest with its own digest recomputed (when its first field is still the seal)."""
    if not raw.startswith(SEAL) or len(raw) < len(SEAL) + 64:
        return raw
    start, end = len(SEAL), len(SEAL) + 64
    return (
        raw[:start]
        + blake3.blake3(raw[:start] + b"0" * 64 + raw[end:]).hexdigest().encode()
        + raw[end:]
    )


def record_tensor_file(directory: Path, raw: bytes) -> None:
    """Record the tensor file's new digest and size in the manifest, and re-seal it."""
    manifest = json.loads((directory / MANIFEST).read_bytes())
    manifest[next(k for k in manifest if k.startswith("manifest_"))] = "0" * 64
    manifest["files"][TENSORS] = {"blake3": blake3.blake3(raw).hexdigest(), "bytes": len(raw)}
    text = json.dumps(manifest, indent=2).encode()
    (directory / MANIFEST).write_bytes(reseal_manifest(text))


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, bytes]]:
    """Edits of a file of `size` bytes: (kind, position, bytes)."""
    kinds = st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "extend"])
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(kinds)
        position = draw(st.integers(0, max(size - 1, 0)) | st.sampled_from([0, 8, 16, size // 2]))
        payload = draw(
            st.binary(min_size=1, max_size=64)
            | st.sampled_from([b"\x00" * 8, b"\xff" * 8, b"{}", b'"', b"9" * 20, b"[" * 100])
        )
        edits.append((kind, position, payload))
    return edits


def mutate(raw: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(raw)
    for kind, position, payload in edits:
        position = min(position, len(data))
        if kind == "flip" and data:
            data[min(position, len(data) - 1)] ^= payload[0] or 1
        elif kind == "overwrite":
            data[position : position + len(payload)] = payload
        elif kind == "insert":
            data[position:position] = payload
        elif kind == "delete":
            del data[position : position + len(payload)]
        elif kind == "truncate":
            del data[position:]
        elif kind == "extend":
            data += payload
    return bytes(data)


def memory_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def bounded(seconds: float, mib: int) -> Iterator[None]:
    """Fail an example that runs over `seconds` or raises this process's peak memory over `mib`."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(
            f"example ran over {seconds} s"
        )  # not a FunctrainError: fails the example

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    start = memory_status("VmRSS")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grown = memory_status("VmHWM") - start
    assert grown < mib << 20, f"the example raised peak memory by {grown >> 20} MiB"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), name=st.sampled_from([MANIFEST, TENSORS]), reseal=st.booleans())
def test_any_bytes_in_any_file_load_or_raise_a_functrain_error(
    reference: Path, data: st.DataObject, name: str, reseal: bool
) -> None:
    like = template()
    with tempfile.TemporaryDirectory(prefix="ft-fuzz-") as tmp:
        d = Path(shutil.copytree(reference, Path(tmp) / "ckpt"))
        raw = (d / name).read_bytes()
        changed = mutate(raw, data.draw(mutations(len(raw)), label="edits"))
        (d / name).write_bytes(reseal_manifest(changed) if reseal and name == MANIFEST else changed)
        if reseal and name == TENSORS:
            record_tensor_file(d, changed)
        with bounded(SECONDS_PER_EXAMPLE, MIB_PER_EXAMPLE):
            for load in (lambda: ser.read_tree(d), lambda: ft.load(d, like=like)):
                try:
                    load()
                except FunctrainError:
                    pass
            assert isinstance(ser.is_checkpoint(d), bool)


def test_the_fuzzer_reaches_the_checks_behind_the_digests(reference: Path) -> None:
    """A re-sealed edit is judged by the parser, not a digest: the fuzz above tests the parsers."""
    with tempfile.TemporaryDirectory(prefix="ft-fuzz-") as tmp:
        d = Path(shutil.copytree(reference, Path(tmp) / "ckpt"))
        raw = (d / TENSORS).read_bytes()
        changed = mutate(raw, [("overwrite", 8, b"[")])  # the header no longer starts with '{'
        (d / TENSORS).write_bytes(changed)
        record_tensor_file(d, changed)
        with pytest.raises(ft.CheckpointCorruptError, match="the header does not start with"):
            ser.read_tree(d)
        raw = (d / MANIFEST).read_bytes()
        (d / MANIFEST).write_bytes(
            reseal_manifest(raw.replace(b'"format_version": 3', b'"format_version": 9'))
        )
        with pytest.raises(ft.CheckpointError, match="format version 9 is newer"):
            ser.read_tree(d)
