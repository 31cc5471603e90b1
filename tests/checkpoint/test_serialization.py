"""The checkpoint format: exact round trips, hostile files rejected, versions, templates.

Every hostile case (truncated or bit-flipped files, edited manifests, traversal, symlinks, bogus
safetensors headers) must raise a `FunctrainError` subclass, never another exception, within a time
bound. Edited manifests are re-sealed (their own SHA-256 recomputed) and edited tensor files get
their digest recomputed in the manifest, so each edit reaches the validation it targets instead of
stopping at a checksum.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import importlib.util
import json
import math
import mmap
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import functrain as ft
from functrain.checkpoint import format as ser
from functrain.checkpoint import reading
from functrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMemoryError,
    FunctrainError,
    StateMismatchError,
)
from tests.models import loss_fn

GOLDEN = Path(__file__).resolve().parent / "golden"
TENSORS = "tensors-00000.safetensors"
MANIFEST = "manifest.json"
ALGORITHM = {1: "sha256", 2: "sha256", 3: "blake3"}  # each format version's digest
SEALS = {
    algorithm: f'{{\n  "manifest_{algorithm}": "'.encode() for algorithm in ("sha256", "blake3")
}
SEAL = SEALS["blake3"]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Pair(NamedTuple):
    first: Any
    second: Any


class Point(NamedTuple):
    x: Any
    y: Any
    z: Any = None


NAMED = {f"{c.__module__}.{c.__qualname__}": c for c in (Pair, Point)}


# ---------------------------------------------------------------------------------------------
# helpers


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test eats
    it."""


@contextlib.contextmanager
def time_limit(seconds: float = 20.0) -> Iterator[None]:
    """Fail a case that runs over `seconds`; abort the run if it is stuck in C code (no signal gets
    in)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def assert_rejected(
    directory: Path, kind: type[FunctrainError] = FunctrainError, match: str | None = None
) -> FunctrainError:
    """Loading `directory` raises `kind` (and nothing else), in bounded time; verify agrees."""
    with time_limit():
        with pytest.raises(kind, match=match) as info:
            ser.read_tree(directory, named_types=NAMED)
        with pytest.raises(kind):
            ser.verify(directory)
        assert not ser.is_checkpoint(directory)
    return info.value


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in row-major order: comparing them compares NaN payloads and -0.0 too."""
    flat = (
        t.detach().clone(memory_format=torch.contiguous_format).reshape(-1)
    )  # stride 1, even for one element
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """`b` is `a`, bit for bit: types, dtypes, shapes, tensor bytes, float bits (NaN: sign only)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert raw_bytes(a) == raw_bytes(b), path
        if not a.is_floating_point():
            assert torch.equal(a, b), path
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        if math.isnan(a):
            # the manifest spells a float leaf as float.hex(): sign kept, NaN payload not
            assert math.isnan(b) and math.copysign(1.0, a) == math.copysign(1.0, b), path
        else:
            assert struct.pack("<d", a) == struct.pack("<d", b), path
    else:
        assert a == b, path


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ft-ser-") as d:
        yield Path(d)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes, algorithm: str = "blake3") -> str:
    return blake3.blake3(data).hexdigest() if algorithm == "blake3" else sha256(data)


def algorithm_of(m: dict[str, Any]) -> str:
    """The digest a manifest's format version uses (BLAKE3 for an edited, unknown version)."""
    return (
        ALGORITHM.get(m.get("format_version"), "blake3")
        if isinstance(m.get("format_version"), int)
        else "blake3"
    )


def seal(raw: bytes) -> bytes:
    """Recompute a manifest's own digest: the digest of its bytes with the digest's 64 hex digits
    zeroed."""
    algorithm = next(a for a, prefix in SEALS.items() if raw.startswith(prefix))
    start, end = len(SEALS[algorithm]), len(SEALS[algorithm]) + 64
    return raw[:start] + digest(raw[:start] + b"0" * 64 + raw[end:], algorithm).encode() + raw[end:]


def dump_manifest(
    m: dict[str, Any], *, text_edit: Callable[[str], str] = lambda s: s, sealed: bool = True
) -> bytes:
    """Serialize an (edited) manifest the way the format lays it out, optionally editing the
    text."""
    body = {k: v for k, v in m.items() if not k.startswith("manifest_")}
    if sealed:
        body = {f"manifest_{algorithm_of(m)}": "0" * 64, **body}
    raw = text_edit(json.dumps(body, indent=2, allow_nan=True)).encode("utf-8", "surrogatepass")
    return seal(raw) if sealed else raw


def read_manifest_json(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_bytes())


def write_manifest(directory: Path, m: dict[str, Any], **kwargs: Any) -> None:
    (directory / MANIFEST).write_bytes(dump_manifest(m, **kwargs))


def as_format(directory: Path, version: int) -> None:
    """Rewrite a checkpoint's manifest as format `version` wrote it: SHA-256 digests before 3,
    unsealed in 1."""
    m = read_manifest_json(directory)
    m["format_version"] = version
    algorithm = ALGORITHM[version]
    for name, info in m["files"].items():
        m["files"][name] = {
            algorithm: digest((directory / name).read_bytes(), algorithm),
            "bytes": info["bytes"],
        }
    write_manifest(directory, m, sealed=version >= 2)


def replace_file(directory: Path, name: str, raw: bytes, *, sealed: bool = True) -> None:
    """Replace a checkpoint file and record its new size and digest, so only its content is
    judged."""
    (directory / name).write_bytes(raw)
    m = read_manifest_json(directory)
    m["files"][name] = {algorithm_of(m): digest(raw, algorithm_of(m)), "bytes": len(raw)}
    write_manifest(directory, m, sealed=sealed)


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(
    header: dict[str, Any] | bytes, data: bytes, *, length: int | None = None
) -> bytes:
    text = (
        header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    )
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---------------------------------------------------------------------------------------------
# random trees


DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,
]
LAYOUTS = ["contiguous", "transposed", "stepped", "offset", "expanded"]


def random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs with payloads, -0.0, subnormals, Inf), valid bools."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    return (
        torch.randint(0, 256, (math.prod(shape) * size,), dtype=torch.uint8, generator=gen)
        .view(dtype)
        .reshape(shape)
    )


def laid_out(dtype: torch.dtype, shape: list[int], layout: str, seed: int) -> torch.Tensor:
    """A tensor of `shape` whose memory layout is `layout` (a view into a larger storage for
    most)."""
    if layout == "transposed" and len(shape) >= 2:
        base = random_tensor(dtype, [*shape[:-2], shape[-1], shape[-2]], seed)
        return base.transpose(-1, -2)
    if layout == "stepped" and shape:
        return random_tensor(dtype, [2 * shape[0], *shape[1:]], seed)[::2]
    if layout == "offset":
        return random_tensor(dtype, [3, *shape], seed)[1]
    if layout == "expanded" and shape:
        return random_tensor(dtype, [1, *shape[1:]], seed).expand(shape)
    return random_tensor(dtype, shape, seed)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    return laid_out(dtype, shape, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**32 - 1)))


def views_of(t: torch.Tensor) -> list[torch.Tensor]:
    """Views sharing `t`'s storage: the same object, reshapes, steps, transposes, single rows."""
    out = [t, t.reshape(-1)[::2], t[..., None]]
    if t.dim() >= 2:
        out.append(t.transpose(0, 1))
    if t.dim() >= 1 and t.shape[0] > 0:
        out += [t[0], t[-1:]]
    return out


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, 1.7976931348623157e308]
    ),
)
INTS = st.one_of(
    st.integers(),
    st.integers(min_value=2**64, max_value=2**300),
    st.integers(min_value=-(2**300), max_value=-(2**63)),
    st.sampled_from([2**64, 2**64 + 1, -(2**64), 10**1000]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.text(max_size=10))


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.builds(Pair, children, children),
        st.builds(Point, children, children, children),
    )


@st.composite
def trees(draw: st.DrawFn) -> Any:
    pool = draw(st.lists(tensors(), min_size=1, max_size=3))
    shared = st.sampled_from(pool).flatmap(lambda t: st.sampled_from(views_of(t)))
    leaves = st.one_of(SCALARS, tensors(), shared)
    return draw(st.recursive(leaves, containers, max_leaves=12))


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)
    ),
    max_leaves=8,
)


# ---------------------------------------------------------------------------------------------
# round trips


@FUZZ
@given(tree=trees(), metadata=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3))
def test_any_tree_round_trips_bit_for_bit(tree: Any, metadata: dict[str, Any]) -> None:
    with scratch() as d:
        path = ft.save(tree, d / "ckpt", metadata=metadata)
        loaded, manifest = ser.read_tree(path, named_types=NAMED)
        assert_same(tree, loaded)
        assert manifest["metadata"] == metadata
        if tree is not None:  # like=None means "no template"
            assert_same(tree, ft.load(path, like=tree))
        assert [p.name for p in d.iterdir()] == ["ckpt"]  # no temporary left behind


@FUZZ
@given(tree=trees())
def test_tensor_files_are_exactly_what_safetensors_writes(tree: Any) -> None:
    """The format is plain safetensors: the library's own writer produces the very same bytes."""
    with scratch() as d:
        path = ft.save(tree, d / "ckpt")
        raw = (path / TENSORS).read_bytes()
        assert safetensors.torch.save(safetensors.torch.load(raw)) == raw


def test_shared_storage_and_repeated_objects_load_as_equal_independent_tensors(
    tmp_path: Path,
) -> None:
    base = torch.arange(12, dtype=torch.float32)
    tree = {
        "a": base,
        "again": base,
        "grid": base.view(3, 4),
        "t": base.view(3, 4).t(),
        "odd": base[1::2],
        "row": base.view(3, 4)[1],
    }
    loaded, _ = ser.read_tree(ft.save(tree, tmp_path / "c"))
    assert_same(tree, loaded)
    loaded["a"].add_(1)
    assert torch.equal(loaded["again"], base)  # loaded tensors do not alias each other


def test_one_element_view_with_a_stride_is_saved(tmp_path: Path) -> None:
    x = torch.tensor([1.5])
    tree = {"strided": x.reshape(-1)[::2], "x": x}  # shape [1], stride (2,), over x's 4 bytes
    assert tree["strided"].stride() == (2,) and tree["strided"].is_contiguous()
    loaded, _ = ser.read_tree(ft.save(tree, tmp_path / "c"))
    assert_same(tree, loaded)


def test_empty_dict_key_at_the_root_keeps_its_own_tensor(tmp_path: Path) -> None:
    # regression: the root key "" once joined to the path of its child, so {"": {"a": x}} and
    # {"a": y} both stored their tensor under "a" and y silently replaced x on load
    tree = {"": {"a": torch.ones(2)}, "a": torch.zeros(2)}
    loaded, _ = ser.read_tree(ft.save(tree, tmp_path / "c"))
    assert_same(tree, loaded)


@pytest.mark.parametrize(
    "value",
    [
        2**64 + 1,
        -(2**200),
        10**4299,
        -0.0,
        math.inf,
        -math.inf,
        5e-324,
        -math.nan,
        math.nan,
        "",
        "a/b%2F\x00\u2028é",
        True,
        None,
    ],
    ids=repr,
)
def test_scalar_leaf_round_trips_exactly(tmp_path: Path, value: Any) -> None:
    loaded, _ = ser.read_tree(ft.save({"x": value, "in": [value]}, tmp_path / "c"))
    assert_same({"x": value, "in": [value]}, loaded)


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"x": object()}, "expected a tensor, None, bool, int, float or str, got object"),
        ({"x": 10**5000}, "x"),
        ({1: torch.ones(1)}, "dict keys must be str"),
        (
            {"x": torch.zeros(2, dtype=torch.complex128)},
            r"complex128.*two real tensors \(torch\.view_as_real\)",
        ),
        ({"\ud800": torch.ones(1)}, "UTF-8"),
    ],
    ids=["object", "int-over-4300-digits", "int-key", "complex128", "lone-surrogate-key"],
)
def test_unsavable_trees_are_refused_with_checkpoint_error(
    tmp_path: Path, tree: Any, match: str
) -> None:
    with pytest.raises(CheckpointError, match=match):
        ft.save(tree, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, 2**70, {1: 2}], ids=["nan", "inf", "int-over-64-bits", "int-key"]
)
def test_metadata_that_json_cannot_hold_exactly_is_refused(tmp_path: Path, bad: Any) -> None:
    # orjson would write NaN and Inf as null: refused instead of silently changed
    with pytest.raises(CheckpointError, match="JSON"):
        ft.save({"w": torch.ones(1)}, tmp_path / "c", metadata={"m": [bad]})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# a reference checkpoint to damage


def reference_tree() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "params": {
            "w": torch.randn(3, 4, generator=gen),
            "b": torch.randn(4, generator=gen).to(torch.bfloat16),
        },
        "opt": Pair(
            torch.arange(6),
            [torch.ones(2, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.float16)],
        ),
        "step": torch.tensor(7, dtype=torch.int32),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "scalars": {
            "lr": 1e-3,
            "n": 2**70,
            "name": "run/1",
            "flag": True,
            "none": None,
            "nan": math.nan,
        },
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ft.save(
        reference_tree(),
        tmp_path_factory.mktemp("reference") / "ckpt",
        metadata={"note": "reference"},
    )


@contextlib.contextmanager
def damaged(reference: Path, *, version: int = 3) -> Iterator[Path]:
    """A private copy of the reference checkpoint to damage (optionally rewritten as an older
    format)."""
    with scratch() as d:
        copy = Path(shutil.copytree(reference, d / "ckpt"))
        if version != 3:
            as_format(copy, version)
        yield copy


def test_reference_checkpoint_loads_and_its_manifest_seals_itself(reference: Path) -> None:
    loaded, manifest = ser.read_tree(reference, named_types=NAMED)
    assert_same(reference_tree(), loaded)
    raw = (reference / MANIFEST).read_bytes()
    assert raw == seal(raw) and manifest["format_version"] == ser.PLAIN_FORMAT_VERSION
    assert sorted(os.listdir(reference)) == [MANIFEST, TENSORS]


def file_and_offset(reference: Path) -> st.SearchStrategy[tuple[str, int]]:
    sizes = {name: (reference / name).stat().st_size for name in sorted(os.listdir(reference))}
    return st.sampled_from(sorted(sizes)).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, sizes[n] - 1))
    )


@FUZZ
@given(data=st.data())
def test_truncated_file_is_rejected_as_corrupt_naming_it(
    reference: Path, data: st.DataObject
) -> None:
    name, offset = data.draw(file_and_offset(reference))
    with damaged(reference) as d:
        with open(d / name, "r+b") as f:
            f.truncate(offset)
        assert_rejected(d, CheckpointCorruptError, match=re.escape(name))


@pytest.mark.parametrize("name", [MANIFEST, TENSORS])
@pytest.mark.parametrize("offset", [0, 1, 7, 8, 9, -1])
def test_truncated_at_the_edges_is_rejected_as_corrupt(
    reference: Path, name: str, offset: int
) -> None:
    with damaged(reference) as d:
        size = (d / name).stat().st_size
        with open(d / name, "r+b") as f:
            f.truncate(offset % size)
        assert_rejected(d, CheckpointCorruptError, match=re.escape(name))


@FUZZ
@given(data=st.data(), bit=st.integers(0, 7))
def test_bit_flip_anywhere_is_rejected_as_corrupt_naming_the_file(
    reference: Path, data: st.DataObject, bit: int
) -> None:
    name, offset = data.draw(file_and_offset(reference))
    with damaged(reference) as d:
        raw = bytearray((d / name).read_bytes())
        raw[offset] ^= 1 << bit
        (d / name).write_bytes(raw)
        assert_rejected(d, CheckpointCorruptError, match=re.escape(name))


def test_every_single_bit_flip_in_the_manifest_is_detected(reference: Path) -> None:
    """Exhaustive over the manifest's first 160 bytes (its digest, version and format fields)."""
    raw = (reference / MANIFEST).read_bytes()
    with damaged(reference) as d:
        for offset in range(160):
            for bit in range(8):
                flipped = bytearray(raw)
                flipped[offset] ^= 1 << bit
                (d / MANIFEST).write_bytes(flipped)
                with pytest.raises(CheckpointCorruptError, match=re.escape(MANIFEST)):
                    ser.read_manifest(d)


# ---------------------------------------------------------------------------------------------
# edited manifests (re-sealed, so the edit itself is judged)


def _first_tensor(m: dict[str, Any]) -> str:
    return sorted(m["tensors"])[0]


MANIFEST_EDITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "size+1": lambda m: m["files"][TENSORS].update(bytes=m["files"][TENSORS]["bytes"] + 1),
    "size-1": lambda m: m["files"][TENSORS].update(bytes=m["files"][TENSORS]["bytes"] - 1),
    "size-huge": lambda m: m["files"][TENSORS].update(bytes=2**62),
    "size-2**80": lambda m: m["files"][TENSORS].update(bytes=2**80),
    "size-negative": lambda m: m["files"][TENSORS].update(bytes=-1),
    "size-str": lambda m: m["files"][TENSORS].update(bytes="100"),
    "size-float": lambda m: m["files"][TENSORS].update(bytes=float(m["files"][TENSORS]["bytes"])),
    "size-bool": lambda m: m["files"][TENSORS].update(bytes=True),
    "size-missing": lambda m: m["files"][TENSORS].pop("bytes"),
    "digest-other": lambda m: m["files"][TENSORS].update({algorithm_of(m): "0" * 64}),
    "digest-upper": lambda m: m["files"][TENSORS].update(
        {algorithm_of(m): m["files"][TENSORS][algorithm_of(m)].upper()}
    ),
    "digest-empty": lambda m: m["files"][TENSORS].update({algorithm_of(m): ""}),
    "digest-int": lambda m: m["files"][TENSORS].update({algorithm_of(m): 12}),
    "digest-of-the-other-format": lambda m: m["files"].update(
        {
            TENSORS: {
                ("sha256" if algorithm_of(m) == "blake3" else "blake3"): m["files"][TENSORS][
                    algorithm_of(m)
                ],
                "bytes": m["files"][TENSORS]["bytes"],
            }
        }
    ),
    "file-entry-list": lambda m: m["files"].update({TENSORS: [1, 2]}),
    "file-dropped": lambda m: m["files"].clear(),
    "file-missing-on-disk": lambda m: m["files"].update(
        {"tensors-00001.safetensors": {algorithm_of(m): "0" * 64, "bytes": 0}}
    ),
    "file-is-manifest": lambda m: m["files"].update(
        {MANIFEST: {algorithm_of(m): "0" * 64, "bytes": 10}}
    ),
    "dtype-other": lambda m: m["tensors"][_first_tensor(m)].update(dtype="float64"),
    "dtype-bogus": lambda m: m["tensors"][_first_tensor(m)].update(dtype="quaternion"),
    "dtype-int": lambda m: m["tensors"][_first_tensor(m)].update(dtype=3),
    "shape-other": lambda m: m["tensors"]["params/w"].update(shape=[4, 3]),
    "shape-empty": lambda m: m["tensors"]["params/w"].update(shape=[]),
    "shape-negative": lambda m: m["tensors"]["params/w"].update(shape=[-3, -4]),
    "shape-str": lambda m: m["tensors"]["params/w"].update(shape="3x4"),
    "index-entry-str": lambda m: m["tensors"].update({"params/w": "x"}),
    "index-extra": lambda m: m["tensors"].update(
        {"ghost": {"file": TENSORS, "dtype": "float32", "shape": [1]}}
    ),
    "index-dropped": lambda m: m["tensors"].pop("params/w"),
    "structure-missing-tensor": lambda m: m["structure"]["dict"]["params"]["dict"].update(
        w={"tensor": "ghost"}
    ),
    "structure-tensor-list": lambda m: m["structure"]["dict"]["params"]["dict"].update(
        w={"tensor": ["params/w"]}
    ),
    "structure-tensor-dict": lambda m: m["structure"]["dict"]["params"]["dict"].update(
        w={"tensor": {"a": 1}}
    ),
    "structure-tensor-int": lambda m: m["structure"]["dict"]["params"]["dict"].update(
        w={"tensor": 5}
    ),
    "structure-tensor-dropped": lambda m: m["structure"]["dict"]["params"]["dict"].pop("w"),
    "structure-dict-list": lambda m: m["structure"].update(dict=[1]),
    "structure-list": lambda m: m.update(structure=[]),
    "structure-node-3-keys": lambda m: m["structure"]["dict"]["scalars"].update(a=1, b=2),
    "structure-node-empty": lambda m: m["structure"]["dict"].update(scalars={}),
    "structure-node-int": lambda m: m["structure"]["dict"].update(scalars=7),
    "structure-unknown-kind": lambda m: m["structure"]["dict"].update(scalars={"set": [1]}),
    "structure-too-deep": lambda m: m["structure"]["dict"].update(
        deep=_nest({"leaf": {"none": True}}, 100)
    ),
    "namedtuple-name-list": lambda m: m["structure"]["dict"]["opt"].update(namedtuple=["x"]),
    "namedtuple-fields-list": lambda m: m["structure"]["dict"]["opt"].update(fields=[1]),
    "leaf-int-garbage": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        n={"leaf": {"int": "12a"}}
    ),
    "leaf-int-huge": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        n={"leaf": {"int": "9" * 5000}}
    ),
    "leaf-int-number": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        n={"leaf": {"int": 12}}
    ),
    "leaf-float-garbage": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        lr={"leaf": {"float": "zz"}}
    ),
    "leaf-float-overflow": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        lr={"leaf": {"float": "0x1p99999"}}
    ),
    "leaf-float-long": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        lr={"leaf": {"float": "1" * 100}}
    ),
    "leaf-bool-int": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(
        flag={"leaf": {"bool": 1}}
    ),
    "leaf-empty": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(flag={"leaf": {}}),
    "leaf-list": lambda m: m["structure"]["dict"]["scalars"]["dict"].update(flag={"leaf": [1]}),
    "format-missing": lambda m: m.pop("format"),
    "format-other": lambda m: m.update(format="pytorch"),
    "version-zero": lambda m: m.update(format_version=0),
    "version-negative": lambda m: m.update(format_version=-1),
    "version-str": lambda m: m.update(format_version="2"),
    "version-float": lambda m: m.update(format_version=2.0),
    "version-bool": lambda m: m.update(format_version=True),
    "version-null": lambda m: m.update(format_version=None),
    "files-list": lambda m: m.update(files=[]),
    "tensors-list": lambda m: m.update(tensors=[]),
    "fingerprint-str": lambda m: m.update(fingerprint="x"),
    "metadata-list": lambda m: m.update(metadata=[]),
    "too-many-files": lambda m: m["files"].update(
        {f"f{i}": {algorithm_of(m): "0" * 64, "bytes": 0} for i in range(5000)}
    ),
}


def _nest(node: dict[str, Any], depth: int) -> dict[str, Any]:
    for _ in range(depth):
        node = {"list": [node]}
    return node


@pytest.mark.parametrize("version", [3, 2, 1], ids=["v3", "v2", "v1"])
@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_edited_manifest_is_rejected(reference: Path, edit: str, version: int) -> None:
    with damaged(reference, version=version) as d:
        m = read_manifest_json(d)
        MANIFEST_EDITS[edit](m)
        write_manifest(d, m, sealed=version >= 2)
        assert_rejected(d)


@pytest.mark.parametrize("like", [False, True], ids=["raw", "like"])
def test_a_float_leaf_beyond_float64_is_corrupt_naming_its_path(tmp_path: Path, like: bool) -> None:
    ft.save({"w": torch.zeros(2), "f": 1.0}, tmp_path / "c")
    m = read_manifest_json(tmp_path / "c")
    m["structure"]["dict"]["f"] = {"leaf": {"float": "0x1p99999"}}
    write_manifest(tmp_path / "c", m)
    with pytest.raises(CheckpointCorruptError, match=r"malformed leaf at 'f': .*0x1p99999"):
        ft.load(tmp_path / "c", like={"w": torch.zeros(2), "f": 1.0} if like else None)


def test_namedtuple_fields_that_do_not_fit_the_class_are_rejected(reference: Path) -> None:
    with damaged(reference) as d:
        m = read_manifest_json(d)
        m["structure"]["dict"]["opt"]["fields"]["third"] = {"leaf": {"none": True}}
        write_manifest(d, m)
        with pytest.raises(
            CheckpointCorruptError, match=r"the fields at 'opt' do not fit .*Pair.*third"
        ):
            ser.read_tree(d, named_types=NAMED)
        assert ser.read_tree(d)[0]["opt"]["third"] is None  # without the class: a plain dict


def test_edited_manifest_without_resealing_is_rejected_as_corrupt(reference: Path) -> None:
    with damaged(reference) as d:
        raw = (d / MANIFEST).read_bytes()
        (d / MANIFEST).write_bytes(raw.replace(b'"lr"', b'"LR"'))
        assert_rejected(
            d, CheckpointCorruptError, match="manifest.json: its BLAKE3 digest does not match"
        )


def _text_edit(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


RAW_EDITS: dict[str, Callable[[str], str]] = {
    "nan-literal": _text_edit('"note": "reference"', '"note": NaN'),
    "infinity-literal": _text_edit('"note": "reference"', '"note": Infinity'),
    "minus-infinity-literal": _text_edit('"note": "reference"', '"note": -Infinity'),
    "huge-float": _text_edit('"note": "reference"', '"note": 1e999999'),
    "huge-int-digits": _text_edit('"note": "reference"', '"note": ' + "9" * 100_000),
    "huge-version": _text_edit('"format_version": 3', '"format_version": 1e400'),
    "duplicate-top-key": _text_edit(
        '"format": "functrain.checkpoint"',
        '"format": "functrain.checkpoint", "format": "functrain.checkpoint"',
    ),
    "duplicate-nested-key": _text_edit(
        '"note": "reference"', '"note": "reference", "note": "again"'
    ),
    "deep-lists-10k": _text_edit('"note": "reference"', '"note": ' + "[" * 10_000 + "]" * 10_000),
    "deep-dicts-10k": _text_edit(
        '"note": "reference"', '"note": ' + '{"a": ' * 10_000 + "1" + "}" * 10_000
    ),
    "deep-lists-unclosed": _text_edit('"note": "reference"', '"note": ' + "[" * 100_000),
    "trailing-garbage": lambda text: text + "}",
    "trailing-comma": _text_edit('"note": "reference"', '"note": "reference",'),
    "single-quotes": _text_edit('"note": "reference"', "'note': 'reference'"),
    "control-char": _text_edit('"note": "reference"', '"note": "a\x01b"'),
}


@pytest.mark.parametrize("edit", sorted(RAW_EDITS))
def test_malformed_manifest_text_is_rejected(reference: Path, edit: str) -> None:
    with damaged(reference) as d:
        m = read_manifest_json(d)
        write_manifest(d, m, text_edit=RAW_EDITS[edit])
        assert_rejected(d)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
        b"{}",
        b"\x00" * 100,
        SEAL + b"0" * 64 + b'"}',
    ],
    ids=[
        "empty",
        "open-brace",
        "list",
        "null",
        "string",
        "bad-utf8",
        "bom",
        "empty-object",
        "zeros",
        "seal-only",
    ],
)
def test_manifest_that_is_not_a_manifest_is_rejected_as_corrupt(
    reference: Path, raw: bytes
) -> None:
    with damaged(reference) as d:
        (d / MANIFEST).write_bytes(raw)
        assert_rejected(d, CheckpointCorruptError, match=MANIFEST)


def test_oversized_manifest_is_rejected_before_reading(reference: Path) -> None:
    with damaged(reference) as d:
        with open(d / MANIFEST, "r+b") as f:
            f.truncate(ser.MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
        assert_rejected(d, CheckpointCorruptError, match="over the limit")


@FUZZ
@given(data=st.data())
def test_random_manifest_edits_raise_only_functrain_errors(
    reference: Path, data: st.DataObject
) -> None:
    """Any value of the manifest replaced by an arbitrary JSON value, re-sealed: a clean result
    either way."""
    with damaged(reference) as d:
        m = read_manifest_json(d)
        node, parent, key = m, None, None
        for _ in range(data.draw(st.integers(1, 6))):
            children = (
                list(node.items())
                if isinstance(node, dict)
                else list(enumerate(node))
                if isinstance(node, list)
                else []
            )
            children = [(k, v) for k, v in children if not str(k).startswith("manifest_")]
            if not children:
                break
            parent, (key, child) = node, data.draw(st.sampled_from(children))
            if not isinstance(child, (dict, list)) or data.draw(st.booleans()):
                break
            node = child
        assume(parent is not None)
        parent[key] = data.draw(
            JSON_VALUES | st.sampled_from([[], {}, -1, 2**62, "../x", {"tensor": "params/w"}])
        )
        write_manifest(d, m)
        with time_limit():
            try:
                ser.read_tree(d, named_types=NAMED)
            except FunctrainError:
                pass


# ---------------------------------------------------------------------------------------------
# file names, symlinks and special files


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "/etc/passwd",
        "a/b",
        "",
        ".",
        "..",
        "x\x00y",
        "x y",
        "é.safetensors",
        "name\n",
        "..safetensors",
        "a" * 300,
        "~root",
    ],
    ids=repr,
)
def test_file_names_outside_the_checkpoint_are_refused(reference: Path, name: str) -> None:
    with damaged(reference) as d:
        raw = (d / TENSORS).read_bytes()
        (d.parent / "outside.safetensors").write_bytes(raw)  # a lure with the right digest
        m = read_manifest_json(d)
        m["files"] = {name: m["files"][TENSORS]}
        m["tensors"] = {k: {**v, "file": name} for k, v in m["tensors"].items()}
        write_manifest(d, m)
        assert_rejected(d, CheckpointCorruptError)


@pytest.mark.parametrize("name", [TENSORS, MANIFEST])
def test_symlink_to_a_file_outside_is_refused(reference: Path, name: str) -> None:
    with damaged(reference) as d:
        outside = d.parent / f"outside-{name}"
        shutil.move(d / name, outside)  # identical bytes: only the link itself is wrong
        (d / name).symlink_to(outside)
        assert_rejected(d, CheckpointError)


def test_fifo_or_directory_in_place_of_a_file_is_refused_without_blocking(reference: Path) -> None:
    for make in (os.mkfifo, os.mkdir):
        with damaged(reference) as d:
            (d / TENSORS).unlink()
            make(d / TENSORS)
            m = read_manifest_json(d)
            m["files"][TENSORS] = {"blake3": digest(b""), "bytes": os.lstat(d / TENSORS).st_size}
            write_manifest(d, m)
            assert_rejected(d, CheckpointCorruptError, match=TENSORS)


def test_missing_file_is_rejected_naming_it(reference: Path) -> None:
    with damaged(reference) as d:
        (d / TENSORS).unlink()
        assert_rejected(d, CheckpointCorruptError, match=f"{TENSORS}: missing")


def test_no_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ft.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ft.load(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# safetensors headers (digests recomputed: the parser itself is judged)


def _edit_header(edit: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    def apply(raw: bytes) -> bytes:
        header, data = split_safetensors(raw)
        edit(header)
        return join_safetensors(header, data)

    return apply


def _with_length(length: int) -> Callable[[bytes], bytes]:
    return lambda raw: struct.pack("<Q", length) + raw[8:]


def _shift(key: str, begin: int, end: int) -> Callable[[dict[str, Any]], None]:
    def edit(h: dict[str, Any]) -> None:
        a, b = h[key]["data_offsets"]
        h[key]["data_offsets"] = [a + begin, b + end]

    return edit


HEADER_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "length-2**64-1": _with_length(2**64 - 1),
    "length-2**63": _with_length(2**63),
    "length-2**40": _with_length(2**40),
    "length-beyond-file": lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
    "length-plus-1": lambda raw: _with_length(struct.unpack("<Q", raw[:8])[0] + 1)(raw),
    "length-minus-1": lambda raw: _with_length(struct.unpack("<Q", raw[:8])[0] - 1)(raw),
    "length-zero": _with_length(0),
    "shorter-than-8": lambda raw: raw[:5],
    "only-length": lambda raw: raw[:8],
    "header-list": lambda raw: join_safetensors(b"[]", split_safetensors(raw)[1]),
    "header-not-utf8": lambda raw: join_safetensors(b'{"\xff": 1}', split_safetensors(raw)[1]),
    "header-not-json": lambda raw: join_safetensors(b"{{{{", split_safetensors(raw)[1]),
    "header-leading-space": lambda raw: join_safetensors(
        b" " + json.dumps(split_safetensors(raw)[0]).encode(), split_safetensors(raw)[1]
    ),
    "header-duplicate-key": lambda raw: join_safetensors(
        b'{"step":{"dtype":"I32","shape":[],"data_offsets":[0,4]},'
        + json.dumps(split_safetensors(raw)[0])[1:].encode(),
        split_safetensors(raw)[1],
    ),
    "entry-not-object": _edit_header(lambda h: h.update(step=[1])),
    "entry-missing-dtype": _edit_header(lambda h: h["step"].pop("dtype")),
    "entry-missing-offsets": _edit_header(lambda h: h["step"].pop("data_offsets")),
    "entry-extra-field": _edit_header(lambda h: h["step"].update(extra=1)),
    "dtype-unknown": _edit_header(lambda h: h["step"].update(dtype="F33")),
    "dtype-same-size": _edit_header(lambda h: h["step"].update(dtype="F32")),
    "dtype-other-size": _edit_header(lambda h: h["step"].update(dtype="I64")),
    "dtype-f4": _edit_header(lambda h: h["bytes"].update(dtype="F4", shape=[10])),
    "dtype-int": _edit_header(lambda h: h["step"].update(dtype=4)),
    "shape-mismatch": _edit_header(lambda h: h["params/w"].update(shape=[4, 4])),
    "shape-transposed": _edit_header(lambda h: h["params/w"].update(shape=[4, 3])),
    "shape-negative": _edit_header(lambda h: h["params/w"].update(shape=[-3, -4])),
    "shape-float": _edit_header(lambda h: h["params/w"].update(shape=[3.0, 4.0])),
    "shape-bool": _edit_header(lambda h: h["step"].update(shape=[True])),
    "shape-overflow": _edit_header(lambda h: h["params/w"].update(shape=[2**62, 2**62, 0])),
    "shape-overflow-nonzero": _edit_header(
        lambda h: h["params/w"].update(shape=[2**32, 2**32, 2**32])
    ),
    "shape-many-dims": _edit_header(lambda h: h["step"].update(shape=[1] * 100_000)),
    "offsets-reversed": _edit_header(
        lambda h: h["step"].update(data_offsets=h["step"]["data_offsets"][::-1])
    ),
    "offsets-overlap": _edit_header(_shift("params/w", -4, 0)),
    "offsets-gap": _edit_header(_shift("params/w", 4, 4)),
    "offsets-beyond": _edit_header(_shift("params/w", 0, 10**6)),
    "offsets-huge": _edit_header(lambda h: h["params/w"].update(data_offsets=[0, 2**64 + 5])),
    "offsets-negative": _edit_header(lambda h: h["params/w"].update(data_offsets=[-48, 0])),
    "offsets-three": _edit_header(
        lambda h: h["params/w"].update(data_offsets=[*h["params/w"]["data_offsets"], 0])
    ),
    "offsets-str": _edit_header(lambda h: h["params/w"].update(data_offsets=["0", "48"])),
    "metadata-not-object": _edit_header(lambda h: h.update(__metadata__=[1])),
    "metadata-not-str": _edit_header(lambda h: h.update(__metadata__={"a": 1})),
    "renamed-tensor": _edit_header(lambda h: h.update(ghost=h.pop("step"))),
    "extra-empty-tensor": _edit_header(
        lambda h: h.update(ghost={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})
    ),
    "empty-tensor-dim-2**63": _edit_header(
        lambda h: h.update(ghost={"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]})
    ),
    "empty-tensor-dim-2**64": _edit_header(
        lambda h: h.update(ghost={"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]})
    ),
    "empty-tensor-strides-overflow": _edit_header(
        lambda h: h.update(
            ghost={"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}
        )
    ),
    "empty-tensor-rank-65": _edit_header(
        lambda h: h.update(ghost={"dtype": "F32", "shape": [0] * 65, "data_offsets": [0, 0]})
    ),
    "data-truncated": lambda raw: raw[:-3],
    "data-extended": lambda raw: raw + b"\x00" * 8,
}


@pytest.mark.parametrize("version", [3, 2, 1], ids=["v3", "v2", "v1"])
@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_bogus_safetensors_header_is_rejected_as_corrupt_naming_the_file(
    reference: Path, edit: str, version: int
) -> None:
    with damaged(reference, version=version) as d:
        replace_file(
            d, TENSORS, HEADER_EDITS[edit]((d / TENSORS).read_bytes()), sealed=version >= 2
        )
        assert_rejected(d, CheckpointCorruptError, match=re.escape(TENSORS))


def _safetensors_reference_load(raw: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return safetensors.torch.load(raw)
    except Exception:  # noqa: BLE001 - any refusal counts as a refusal here
        return None


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_header_is_rejected_or_read_as_the_safetensors_library_reads_it(
    reference: Path, data: st.DataObject
) -> None:
    """Random byte edits in the length prefix and header; whatever loads, safetensors reads the
    same."""
    raw = (reference / TENSORS).read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    edits = data.draw(
        st.lists(
            st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4
        )
    )
    mutated = bytearray(raw)
    for offset, value in edits:
        mutated[offset] = value
    with damaged(reference) as d:
        replace_file(d, TENSORS, bytes(mutated))
        with time_limit():
            try:
                tree, manifest = ser.read_tree(d, named_types=NAMED)
            except CheckpointCorruptError as e:
                assert TENSORS in str(e) or MANIFEST in str(e)
                return
        theirs = _safetensors_reference_load(bytes(mutated))
        assert theirs is not None, "functrain accepted a file the safetensors library refuses"
        ours = ser.leaves_by_path(tree)
        for key, t in theirs.items():
            assert (
                raw_bytes(t) == raw_bytes(ours[key])
                and t.dtype == ours[key].dtype
                and t.shape == ours[key].shape
            )


# ---------------------------------------------------------------------------------------------
# crafted files: a checksum is not a signature, so every edit here is re-sealed


def crafted(
    directory: Path,
    shapes: dict[str, list[int]],
    *,
    in_header: bool = True,
    file_bytes: int | None = None,
) -> Path:
    """A checkpoint of tensors w (2 float32) and z (empty) whose index, and header, declare
    `shapes`.

    With `file_bytes` the tensor file is extended (sparse) to that size and its digest left wrong:
    what is judged is whether anything that size is allocated or read before the refusal.
    """
    d = ft.save({"w": torch.ones(2), "z": torch.empty(0)}, directory / "ckpt")
    header, data = split_safetensors((d / TENSORS).read_bytes())
    m = read_manifest_json(d)
    for key, shape in shapes.items():
        m["tensors"][key]["shape"] = shape
        if in_header:
            header[key]["shape"] = shape
    raw = join_safetensors(header, data)
    (d / TENSORS).write_bytes(raw)
    m["files"][TENSORS] = {"blake3": digest(raw), "bytes": len(raw)}
    if file_bytes is not None:
        os.truncate(d / TENSORS, file_bytes)
        m["files"][TENSORS]["bytes"] = file_bytes
    write_manifest(d, m)
    return d


@pytest.mark.parametrize("in_header", [True, False], ids=["header-and-index", "index-only"])
@pytest.mark.parametrize(
    "shape", [[0, 2**63], [2**40, 2**40, 0], [0] * 65], ids=["0x2^63", "2^40x2^40x0", "rank-65"]
)
def test_zero_byte_tensor_with_huge_dimensions_is_corrupt_for_load_verify_and_is_checkpoint(
    tmp_path: Path, shape: list[int], in_header: bool
) -> None:
    d = crafted(tmp_path, {"z": shape}, in_header=in_header)
    where = (
        "invalid shape|spans more than"
        if in_header
        else "index entry for tensor 'z': invalid shape"
    )
    assert_rejected(d, CheckpointCorruptError, match=where)  # read_tree, verify, is_checkpoint
    with pytest.raises(CheckpointCorruptError, match=where):
        ft.load(d)


def test_sparse_terabyte_tensor_file_is_refused_as_more_than_the_memory_available_before_reading(
    tmp_path: Path,
) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = crafted(tmp_path, {}, file_bytes=1 << 40)
    needs = (
        r"manifest.json: loading this checkpoint needs 1,048,576.0 MiB of memory .* available now"
    )
    with time_limit():
        for read in (ser.read_tree, ser.verify, ser.is_checkpoint):
            with pytest.raises(CheckpointMemoryError, match=needs):
                read(d)
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10
    )  # KiB: nothing near a TiB touched


def test_sparse_terabyte_tensor_file_is_refused_by_its_header_before_its_data_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        ser, "_check_memory", lambda total, on_disk: None
    )  # as on a machine with more than a TiB
    allocated: list[int] = []
    real_read = reading.read_hashed
    monkeypatch.setattr(
        reading,
        "read_hashed",
        lambda fd, offset, nbytes, *rest: (
            allocated.append(nbytes) or real_read(fd, offset, nbytes, *rest)
        ),
    )
    d = crafted(tmp_path, {}, file_bytes=1 << 40)  # the header still declares 8 bytes of data
    assert_rejected(
        d,
        CheckpointCorruptError,
        match=rf"{TENSORS}: the tensors cover 8 bytes of data, the file holds \d+",
    )
    assert allocated == []


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: not enough memory"),
        MemoryError(),
    ],
    ids=repr,
)
def test_allocation_failure_while_loading_is_a_memory_error_not_a_corrupt_checkpoint(
    reference: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    no_mapping(monkeypatch)  # where files cannot be mapped, a load allocates a buffer to read into
    real_empty = torch.empty

    def failing_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        if args and isinstance(args[0], int) and args[0] > 0 and kwargs.get("dtype") is torch.uint8:
            raise failure
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", failing_empty)
    with pytest.raises(
        CheckpointMemoryError,
        match=f"{TENSORS}: cannot allocate the .* bytes of its tensors \\({type(failure).__name__}",
    ) as info:
        ser.read_tree(reference)
    assert not isinstance(info.value, CheckpointCorruptError)
    with pytest.raises(CheckpointMemoryError):  # it cannot say: the checkpoint may be sound
        ser.is_checkpoint(reference)


def no_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every mmap fail (the anonymous buffers a load reads into): plain allocations then."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap, "mmap", refuse)


def test_loaded_tensors_are_writable_memory_of_their_own_that_never_changes_the_file(
    reference: Path,
) -> None:
    with damaged(reference) as d:
        before = (d / TENSORS).read_bytes()
        tree, _ = ser.read_tree(d, named_types=NAMED)
        tree["params"]["w"].add_(
            1.0
        )  # no warning about a read-only buffer, and the file is untouched
        tree["bytes"].zero_()
        assert (d / TENSORS).read_bytes() == before
        assert_same(reference_tree(), ser.read_tree(d, named_types=NAMED)[0])


def test_without_mmap_buffers_a_load_reads_the_same_bits(
    reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_mapping(monkeypatch)
    loaded, _ = ser.read_tree(reference, named_types=NAMED)
    assert_same(reference_tree(), loaded)
    with damaged(reference) as d:
        raw = bytearray((d / TENSORS).read_bytes())
        raw[-1] ^= 1
        (d / TENSORS).write_bytes(bytes(raw))
        assert_rejected(d, CheckpointCorruptError, match=f"{TENSORS}: BLAKE3 digest does not match")


PATHOLOGICAL_JSON = {
    "empty-dicts": b"[" + b",".join([b"{}"] * 50_000) + b"]",
    "one-key-dicts": b"[" + b",".join([b'{"a":1}'] * 50_000) + b"]",
    "empty-lists": b"[" + b",".join([b"[]"] * 50_000) + b"]",
    "unique-keys": b"{" + b",".join(b'"%d":0' % i for i in range(50_000)) + b"}",
    "floats": b"[" + b",".join([b"1.5"] * 50_000) + b"]",
    "big-ints": b"[" + b",".join([b"123456789012345678901234567890"] * 20_000) + b"]",
    "astral-string": b'["\xf0\x9f\x98\x80' + b"a" * 200_000 + b'"]',
    "nested": b"[" * 60 + b"]" * 60,
    "long-keys": b"{" + b",".join(b'"%s":null' % (b"k%d" % i * 20) for i in range(5_000)) + b"}",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL_JSON))
def test_json_cost_estimate_bounds_what_parsing_really_takes(name: str) -> None:
    from functrain.checkpoint.tensorfile import (
        finite_float,
        json_cost,
        no_constants,
        unique_keys,
    )

    text = PATHOLOGICAL_JSON[name]
    tracemalloc.start()
    try:
        json.loads(
            text,
            object_pairs_hook=unique_keys("x"),
            parse_constant=no_constants("x"),
            parse_float=finite_float("x"),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert json_cost(text) >= peak, f"estimated {json_cost(text)}, took {peak}"


PEAK_SCRIPT = """
import json, sys, time
import functrain as ft

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS: the import's own peak is not counted
start_rss, start = status("VmRSS"), time.perf_counter()
try:
    ft.load(sys.argv[1])
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {str(e)[:300]}"
seconds, peak = time.perf_counter() - start, status("VmHWM") - start_rss
print(json.dumps({"error": error, "seconds": seconds, "peak_bytes": peak}))
"""


def peak_of_loading(path: Path) -> dict[str, Any]:
    """Load `path` in a fresh process: its error, seconds, and peak memory over the start."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(ft.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_crafted_95_mib_header_and_63_mib_manifest_cost_a_small_multiple_of_their_size(
    tmp_path: Path,
) -> None:
    # a header of 95 MiB of tiny objects: `{"k0":{},...}` (was 1.9 GiB and 16 s to refuse)
    header = b"{" + b",".join(b'"k%07d":{}' % i for i in range(95 * 2**20 // 14)) + b"}"
    header_ckpt = crafted(tmp_path / "h", {})
    raw = join_safetensors(header, (header_ckpt / TENSORS).read_bytes()[-8:])
    replace_file(header_ckpt, TENSORS, raw)
    # a manifest of 63 MiB of empty dicts (was 1.8 GiB)
    manifest_ckpt = crafted(tmp_path / "m", {})
    (manifest_ckpt / MANIFEST).write_bytes(b'{"metadata": [' + b"{}," * (63 * 2**20 // 3) + b"{}]}")
    for path, size, why in [
        (header_ckpt, len(raw), "header length .* exceeds the file .* or the limit"),
        (manifest_ckpt, 63 << 20, "could take .* MiB of memory, over the limit"),
    ]:
        got = peak_of_loading(path)
        assert got["error"] is not None and re.match(
            f"CheckpointCorruptError: .*{why}", got["error"]
        ), got
        assert got["peak_bytes"] < 3 * size and got["seconds"] < 10, got


def test_safetensors_header_is_refused_before_parsing_when_its_parse_would_cost_too_much() -> None:
    from functrain.checkpoint import tensorfile

    text = (
        b"{" + b",".join(b'"k%d":{}' % i for i in range(2_000_000)) + b"}"
    )  # 21 MiB, about 500 MiB to parse
    with (
        time_limit(5.0),
        pytest.raises(
            CheckpointCorruptError,
            match=r"t\.safetensors: parsing its \d+ bytes of JSON could take \d+ MiB",
        ),
    ):
        tensorfile.parse_header("t.safetensors", text, 0)


def test_saving_a_tree_whose_manifest_a_load_would_refuse_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the limit a load keeps lowered to 64 KiB, for save and load alike: a tree of 64 MiB of
    # manifest takes tens of seconds to walk, through the same check
    monkeypatch.setattr(ser, "MAX_MANIFEST_BYTES", 64 << 10)
    tree = {"w": torch.ones(1), "many": [None] * 5_000}  # about 230 KiB of manifest
    with pytest.raises(
        CheckpointError, match="cannot save this tree: manifest.json: .* keep large data in tensors"
    ):
        ft.save(tree, tmp_path / "c")
    assert not (tmp_path / "c").exists() and os.listdir(tmp_path) == []


def test_manifest_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(
    reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with damaged(reference) as d:
        real_lstat = os.lstat

        def swap_then_check(path: Any, **kwargs: Any) -> os.stat_result:
            found = real_lstat(path, **kwargs)
            if (
                Path(path) == d / MANIFEST
            ):  # between the check and the open, as another process could
                (d / MANIFEST).unlink()
                os.mkfifo(d / MANIFEST)
            return found

        monkeypatch.setattr(os, "lstat", swap_then_check)
        with (
            time_limit(5.0),
            pytest.raises(CheckpointCorruptError, match="manifest.json: is not a regular file"),
        ):
            ser.read_manifest(d)


# ---------------------------------------------------------------------------------------------
# no pickle, ever


def full_state() -> ft.TrainState:
    """A state with optimizer state, EMA, BatchNorm buffers and RNG, after two real steps."""
    golden = load_golden_module()
    state = golden.build_state()
    for batch in golden.batches()[:2]:
        state, _ = ft.train_step(state, batch)
    return state


def test_save_and_load_never_unpickle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import _pickle

    state = full_state()
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return refused

    for module, attr in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (_pickle, "load"),
        (_pickle, "loads"),
        (_pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ]:
        monkeypatch.setattr(module, attr, refuse(f"{module.__name__}.{attr}"))

    path = ft.save(state, tmp_path / "c")
    restored = ft.load(path, like=state)
    raw_tree, manifest = ft.load(path)
    assert calls == []
    assert_same(state.tree(), restored.tree())
    for key, leaf in ser.leaves_by_path(state.tree()).items():
        assert_same(leaf, ser.leaves_by_path(raw_tree)[key])
    assert manifest["fingerprint"] == ft.fingerprint(state)
    assert restored.ema_state is not None and "1.running_var" in restored.buffers


# ---------------------------------------------------------------------------------------------
# format versions


def test_newer_format_version_asks_to_upgrade(reference: Path) -> None:
    with damaged(reference) as d:
        m = read_manifest_json(d)
        m["format_version"] = ser.FORMAT_VERSION + 1
        m["some_future_field"] = {"x": 1}
        write_manifest(d, m)
        with pytest.raises(
            CheckpointError,
            match=r"format version 6 is newer than this functrain reads \(up to 5\).*upgrade "
            r"functrain",
        ) as info:
            ft.load(d)
        assert not isinstance(info.value, CheckpointCorruptError)


def load_golden_module() -> Any:
    spec = importlib.util.spec_from_file_location("functrain_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the golden state's adamw(fused=False) trained through a chain of states when it was written,
# and trains by its formula now (functrain.optim.rules.formula.RuleState): each saved leaf's path
_FORMULA_PATHS = (
    (r"^opt_state/inner/0/(mu|nu)/(\d+)$", r"opt_state/inner/slots/\1/\2"),
    (r"^opt_state/inner/[02]/count$", "opt_state/inner/count"),
    (r"^opt_state/inner/2/lr$", "opt_state/inner/lr"),
)


def _in_formula_layout(path: str) -> str:
    for pattern, replacement in _FORMULA_PATHS:
        path = re.sub(pattern, replacement, path)
    return path


@pytest.mark.parametrize(
    ("version", "seal"),
    [(1, None), (2, "manifest_sha256"), (3, "manifest_blake3")],
    ids=["v1-unsealed", "v2-sha256", "v3-blake3"],
)
def test_golden_checkpoint_of_each_format_version_loads_exactly_into_a_fresh_template(
    version: int, seal: str | None
) -> None:
    golden = load_golden_module()
    manifest = ser.verify(GOLDEN / f"v{version}")
    assert manifest["format_version"] == version
    assert [k for k in manifest if k.startswith("manifest_")] == ([seal] if seal else [])
    state = ft.load(GOLDEN / f"v{version}", like=golden.build_state())
    saved = json.loads((GOLDEN / f"v{version}_expected.json").read_text())
    got = {path: golden.describe(leaf) for path, leaf in ser.leaves_by_path(state.tree()).items()}
    # each saved leaf, bit for bit, where today's state holds it (its optimizer's moments in the
    # formula's layout), and the numbers the formula's state adds: its own, or the count's
    expected = {_in_formula_layout(path): leaf for path, leaf in saved.items()}
    assert {k: got[k] for k in expected} == expected
    added = {k: v for k, v in got.items() if k not in expected}
    assert sorted(added) == [
        "opt_state/inner/group/steps_at",
        "opt_state/inner/hyperparameters/lr",
        "opt_state/inner/hyperparameters/weight_decay",
        *(f"opt_state/inner/slots/step/{i}" for i in range(6)),
    ]
    steps = state.opt_state.inner.steps
    assert [float(s) for s in steps] == [3.0] * 6  # (each weight took every update)
    assert int(state.step) == 3 and float(state.params["0.weight"][0, 0]) == float.fromhex(
        expected["params/0.weight"]["first"][0]
    )


def test_golden_files_of_format_3_carry_blake3_digests_of_their_bytes() -> None:
    manifest = ser.read_manifest(GOLDEN / "v3")
    for name, info in manifest["files"].items():
        assert info == {
            "blake3": digest((GOLDEN / "v3" / name).read_bytes()),
            "bytes": (GOLDEN / "v3" / name).stat().st_size,
        }
    raw = (GOLDEN / "v3" / MANIFEST).read_bytes()
    zeroed = raw[: len(SEAL)] + b"0" * 64 + raw[len(SEAL) + 64 :]
    assert manifest["manifest_blake3"] == digest(zeroed) != sha256(zeroed)[:64]


def test_a_checkpoint_pinned_by_its_manifest_digest_refuses_a_resealed_manifest(
    reference: Path,
) -> None:
    pinned = ser.verify(reference)["manifest_blake3"]
    with damaged(reference) as d:
        assert ser.read_tree(d, digest=pinned)[1]["manifest_blake3"] == pinned
        m = read_manifest_json(d)
        m["metadata"]["note"] = "swapped"
        write_manifest(d, m)  # re-sealed: consistent, and no longer what was pinned
        assert ser.verify(d)["metadata"]["note"] == "swapped"
        for read in (
            lambda: ser.verify(d, digest=pinned),
            lambda: ft.load(d, digest=pinned),
            lambda: ser.read_manifest(d, digest=pinned),
        ):
            with pytest.raises(CheckpointCorruptError, match=f"expected the pinned {pinned}"):
                read()


# ---------------------------------------------------------------------------------------------
# loading against a template


def test_template_mismatch_lists_every_problem_in_one_error(tmp_path: Path) -> None:
    saved = ft.TrainState.create(
        nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), ft.adamw(1e-3), loss_fn
    )
    path = ft.save(saved, tmp_path / "c")
    # a wider first layer, no BatchNorm, a float64 last layer, another lr, clipping on
    template = ft.TrainState.create(
        nn.Sequential(nn.Linear(4, 9), nn.Identity(), nn.Linear(9, 2).double()),
        ft.adamw(2e-3),
        loss_fn,
        clip_grad_norm=1.0,
    )
    with pytest.raises(StateMismatchError) as info:
        ft.load(path, like=template)
    message = str(info.value)
    expected = [
        "does not fit the template",
        "missing from the checkpoint: ['opt_state/inner/0/grad_norm'",  # clipping's state
        "in the checkpoint but not in the template: ['buffers/1.num_batches_tracked', "
        "'buffers/1.running_mean', 'buffers/1.running_var'",
        "'params/1.bias', 'params/1.weight']",
        "params/0.weight: expected [9, 4] torch.float32, got [8, 4] torch.float32",
        "params/2.weight: expected [2, 9] torch.float64, got [2, 8] torch.float32",
        "params/2.bias: expected [2] torch.float64, got [2] torch.float32",
        # as written: the default non-finite guard around both is left out
        "optimizer differs: checkpoint has 'adamw(lr=0.001,",
        "template has 'chain(clip_by_global_norm(max_norm=1.0), adamw(lr=0.002,",
        "step options differ: checkpoint has {'precision': 'fp32', 'accumulate_steps': 1, "
        "'clip_grad_norm': None",
        "template has {'precision': 'fp32', 'accumulate_steps': 1, 'clip_grad_norm': 1.0",
    ]
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert "skip_nonfinite" not in message


def test_other_hyperparameters_alone_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = ft.save(ft.TrainState.create(nn.Linear(2, 1), ft.adamw(1e-3), loss_fn), tmp_path / "c")
    template = ft.TrainState.create(
        nn.Linear(2, 1), ft.adamw(1e-3, weight_decay=0.1), loss_fn, ema_decay=0.5
    )
    with pytest.raises(
        StateMismatchError,
        match=r"weight_decay=0.01.*weight_decay=0.1(.|\n)*'ema_decay': None.*'ema_decay': 0.5",
    ):
        ft.load(path, like=template)


def _masked_run(tmp_path: Path, mask: Callable[[str, torch.Tensor], bool]) -> ft.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    return ft.TrainState.create(model, ft.adamw(0.1, weight_decay=0.5, mask=mask), loss_fn)


def _assert_two_steps_of_torch(
    resumed: ft.TrainState, batch: Any, optimizer: Callable[[nn.Module], torch.optim.Optimizer]
) -> None:
    """`resumed`'s weights are those of two steps on `batch` of torch's `optimizer(model)`, from
    the two-layer model `_masked_run` builds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = optimizer(model)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(resumed.params[name], p.detach()), name


def test_a_mask_or_labels_deciding_otherwise_under_the_same_name_is_refused(
    tmp_path: Path,
) -> None:
    # two functions are named alike (mask=<lambda>), whatever they decide
    saved = _masked_run(tmp_path, lambda name, p: p.ndim == 2)
    batch = (torch.randn(8, 4), torch.randn(8, 4))
    saved, _ = ft.train_step(saved, batch)
    path = ft.save(saved, tmp_path / "c")
    other = _masked_run(tmp_path, lambda name, p: p.ndim == 1)
    assert other.tx.name == saved.tx.name
    with pytest.raises(
        StateMismatchError, match=r"decides otherwise .* for \['0.bias', '0.weight'"
    ):
        ft.load(path, like=other)
    # another function deciding the same resumes as torch's AdamW with decay on the matrices only
    resumed = ft.load(path, like=_masked_run(tmp_path, lambda name, p: "weight" in name))
    resumed, _ = ft.train_step(resumed, batch)
    _assert_two_steps_of_torch(
        resumed,
        batch,
        lambda model: torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": 0.5},
                {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
            ],
            lr=0.1,
            fused=True,  # ft.adamw's kernel
        ),
    )

    # a partition's labels likewise
    def split(labels: Callable[[str, torch.Tensor], str]) -> ft.TrainState:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        tx = ft.partition(labels, a=ft.sgd(0.1, momentum=0.9), b=ft.sgd(0.01, momentum=0.9))
        return ft.TrainState.create(model, tx, loss_fn)

    first = split(lambda name, p: "a" if name.startswith("0.") else "b")
    path = ft.save(ft.train_step(first, batch)[0], tmp_path / "p")
    with pytest.raises(StateMismatchError, match="partition's labels decides otherwise"):
        ft.load(path, like=split(lambda name, p: "b" if name.startswith("0.") else "a"))


def test_a_mask_that_reads_values_saves_and_resumes_as_torch(tmp_path: Path) -> None:
    # the mask answers with a tensor of the parameter's values, which an update takes as a bool;
    # the checkpoint records it on meta-device parameters, which hold no values to read
    def by_values(name: str, p: torch.Tensor) -> torch.Tensor:
        return (p != 0).all()

    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen))
    saved, _ = ft.train_step(_masked_run(tmp_path, by_values), batch)
    path = ft.save(saved, tmp_path / "c")
    resumed, _ = ft.train_step(ft.load(path, like=_masked_run(tmp_path, by_values)), batch)
    _assert_two_steps_of_torch(
        resumed,
        batch,
        lambda model: torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5, fused=True),
    )


def test_a_weight_decay_function_of_other_values_under_the_same_name_is_refused(
    tmp_path: Path,
) -> None:
    # a plain function given as weight_decay is named alone (weight_decay=<lambda>)
    def run(decay: Callable[[int], float]) -> ft.TrainState:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        return ft.TrainState.create(model, ft.sgd(0.1, weight_decay=decay), loss_fn)

    batch = (torch.randn(8, 4), torch.randn(8, 4))
    saved, _ = ft.train_step(run(lambda step: 0.01), batch)
    path = ft.save(saved, tmp_path / "c")
    other = run(lambda step: 0.5 if step > 100 else 0.01)
    assert other.tx.name == saved.tx.name
    with pytest.raises(StateMismatchError, match=r"weight decay <lambda>.* differs from the"):
        ft.load(path, like=other)
    # the same values resume as torch's SGD with that decay
    resumed, _ = ft.train_step(ft.load(path, like=run(lambda step: 0.01 + 0 * step)), batch)
    _assert_two_steps_of_torch(
        resumed,
        batch,
        lambda model: torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01),
    )


def test_plain_tree_mismatch_lists_missing_extra_shape_dtype_and_kind(tmp_path: Path) -> None:
    path = ft.save(
        {
            "a": torch.zeros(2),
            "b": torch.zeros(3),
            "c": torch.zeros(1),
            "d": 1,
            "old": torch.ones(1),
        },
        tmp_path / "c",
    )
    template = {
        "a": torch.zeros(3),
        "b": torch.zeros(3, dtype=torch.int64),
        "c": 1.0,
        "d": torch.zeros(1),
        "new": torch.ones(1),
    }
    with pytest.raises(StateMismatchError) as info:
        ft.load(path, like=template)
    message = str(info.value)
    for part in [
        "missing from the checkpoint: ['new']",
        "in the checkpoint but not in the template: ['old']",
        "a: expected [3] torch.float32, got [2] torch.float32",
        "b: expected [3] torch.int64, got [3] torch.float32",
        "c: expected float, got Tensor[1] torch.float32",
        "d: expected Tensor[1] torch.float32, got int",
    ]:
        assert part in message, f"{part!r} not in:\n{message}"


def test_load_into_a_template_keeps_its_static_parts_and_devices(tmp_path: Path) -> None:
    state = full_state()
    template = load_golden_module().build_state()
    restored = ft.load(ft.save(state, tmp_path / "c"), like=template)
    assert restored.module is template.module and restored.tx is template.tx
    assert_same(state.tree(), restored.tree())
    more, _ = ft.train_step(restored, load_golden_module().batches()[2])
    assert int(more.step) == 3


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("step", torch.tensor([1, 2]), "step: expected [] torch.int64, got [2] torch.int64"),
        ("epoch", torch.tensor(1.0), "epoch: expected [] torch.int64, got [] torch.float32"),
        ("samples_seen", 3, "samples_seen: expected Tensor[] torch.int64, got int"),
        (
            "rng",
            torch.zeros(3, dtype=torch.uint8),
            "rng: expected [5056] torch.uint8, got [3] torch.uint8",
        ),
        ("rng", None, "rng: expected Tensor[5056] torch.uint8, got NoneType"),
    ],
    ids=["step-shape", "epoch-dtype", "counter-int", "rng-short", "rng-none"],
)
def test_counters_and_rng_must_be_what_the_template_holds(
    tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    state = ft.TrainState.create(nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
    # written past `save`'s own checks, as a crafted checkpoint is
    fp = ft.fingerprint(state)
    path = ser.write_tree(tmp_path / "c", {**state.tree(), field: value}, fingerprint=fp)
    with pytest.raises(StateMismatchError, match=re.escape(expected)):
        ft.load(path, like=state)


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ({"history": {"train": "rows"}}, "driver/history/train: expected a list of rows"),
        (
            {"history": {"train": [{"loss": [0.5]}]}},
            "driver/history/train: expected a list of rows",
        ),
        (
            {"window": {"keys": ["loss"], "sums": torch.zeros(3, dtype=torch.float64), "count": 2}},
            r"driver/window/sums: expected a float64 tensor of shape \[1\]",
        ),
        (
            {"epoch_sums": {"keys": ["loss"], "sums": None, "count": 1}},
            "driver/epoch_sums/sums: expected a float64 tensor",
        ),
        (
            {"window": {"keys": "loss", "count": -1}},
            "driver/window/keys: expected a list of metric names(.|\n)*driver/window/count: "
            "expected an int >= 0",
        ),
        ({"empty_batches": "many"}, "driver/empty_batches: expected an int >= 0, got str many"),
        (
            {"early_stopping": {"best": "low", "bad_evals": 1}},
            "driver/early_stopping: expected None or a dict with best",
        ),
        (
            {"best": {"val_loss": {"x": 1}}},
            "driver/best: expected None or a dict of metric names to numbers",
        ),
        ({"stop_reason": 3}, "driver/stop_reason: expected None or a str, got int 3"),
        ({"runs": 2}, r"driver: unknown keys \['runs'\]"),
    ],
    ids=[
        "history-not-rows",
        "history-row-list",
        "sums-shape",
        "sums-missing",
        "window-keys-count",
        "empty-batches",
        "early-stopping",
        "best",
        "stop-reason",
        "unknown-key",
    ],
)
def test_driver_records_fit_could_not_resume_from_are_corrupt_naming_the_path(
    tmp_path: Path, driver: dict[str, Any], expected: str
) -> None:
    state = ft.TrainState.create(nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
    # written past `save`'s own checks (it refuses these), as a crafted checkpoint is
    fp = ft.fingerprint(state)
    path = ser.write_tree(tmp_path / "c", {**state.tree(), "driver": driver}, fingerprint=fp)
    with pytest.raises(
        CheckpointCorruptError,
        match="holds driver records \\(state.driver\\) that fit cannot resume "
        f"from:(.|\n)*{expected}",
    ):
        ft.load(path, like=state)
    assert (
        ft.load(path)[0]["driver"].keys() == driver.keys()
    )  # without a template: the raw tree, for inspection


def test_the_driver_registers_its_records_check_on_import() -> None:
    from functrain.checkpoint import state_io
    from functrain.driver.ledger import tree_problems

    assert state_io._driver_checks == [tree_problems]


def test_driver_records_of_a_real_run_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create(
        nn.Linear(4, 1), ft.adamw(1e-2), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
    )
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(6)]
    result = ft.fit(
        state, data, max_epochs=2, eval_data=data[:2], eval_every=3, log_every=2,
        early_stopping=ft.EarlyStopping("val_loss", patience=5), progress=False, verbosity="silent",
    )  # fmt: skip
    assert {"history", "window", "early_stopping"} <= set(result.state.driver)
    restored = ft.load(ft.save(result.state, tmp_path / "c"), like=state)
    assert restored.driver["history"] == result.state.driver["history"]
