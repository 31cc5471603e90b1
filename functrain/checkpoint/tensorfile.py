"""Tensor files in the safetensors format: the bytes to write, and a strict parser.

The writer lays tensors out exactly as the safetensors library does (the files are its bytes); the
parser is strict and bounded (header size, offsets, rank, every dimension and the shape's
products), raising `CheckpointCorruptError` on anything malformed instead of trusting the input.

Why not the ``safetensors`` package's own parser: a checkpoint read must check the header against
the manifest before touching the data, hash every byte once, and hand the tensors out as views of
the bytes it hashed. The package offers either `safe_open` (it maps the file and reads lazily:
verifying would be a second pass over the bytes) or `load(bytes)` (a copy of the whole file into a
`bytes` object, then a copy of every tensor out of it). Nor does it bound what a crafted file
costs (a crafted header of many zero-size entries takes it gigabytes of memory) or turn every
malformed shape into its own error: a zero-size tensor of shape ``[0, 2**63]`` escapes `load` as a
raw `TypeError` (figures in ``benchmarks/README.md``). What the package gives that this module must
match is its exact bytes, which the tests check against `safetensors.torch.save`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import torch

from functrain.errors import CheckpointCorruptError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_RANK = 64
# the largest product of a shape's dimensions (zeros counted as 1): torch computes strides and the
# storage size from it in int64, so a zero-size tensor of shape [2**40, 2**40, 0] must be refused
# too
MAX_SPAN = 1 << 62
# What parsing a JSON text (a header, a manifest) may cost in memory, estimated before parsing it:
# Python objects cost up to 25 times their text ("{}" is 2 bytes, an empty dict 64 plus its slot).
# Real files estimate at 4 to 10 times their size; 512 MiB admits a manifest of a state with a
# million tensors and refuses crafted files of a few MiB made of tiny containers.
MAX_JSON_MEMORY = 512 << 20

# safetensors dtype codes, in the order of the library's Dtype enum: it lays tensors out by
# descending code, then by name, and so must we for the files to be the very bytes it writes
_CODES = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
_RANK = {code: i for i, code in enumerate(_CODES)}
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "F64": "float64", "I64": "int64", "U64": "uint64",
}  # fmt: skip
# safetensors dtype code -> torch dtype, for the dtypes this torch has
DTYPE_OF = {
    code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)
}
CODE_OF = {dtype: code for code, dtype in DTYPE_OF.items()}


def bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a CPU tensor filling its storage in row-major order, as bytes, not copied."""
    if not t.numel():
        return memoryview(b"")
    # not reshape(-1): a one-element view may keep any stride, and view(uint8) wants stride 1
    flat = t.as_strided((t.numel(),), (1,)).view(torch.uint8)
    # numpy's stubs declare no buffer protocol for this Python; an ndarray has one
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def safetensors_chunks(tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """A safetensors file as the buffers to write in order: the header, then the tensors' memory.

    The bytes are exactly those of ``safetensors.torch.save(tensors)``: tensors by descending
    dtype code then by name, offsets back to back, the JSON header padded with spaces to 8 bytes.
    The tensors' buffers are their own memory, not copies: `functrain.checkpoint.files.write_file`
    copies each piece it writes into a buffer of its own and hashes it there.
    """
    ordered = sorted(tensors.items(), key=lambda kv: (-_RANK[CODE_OF[kv[1].dtype]], kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in ordered:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": CODE_OF[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    views = [bytes_of(t) for _, t in ordered]
    return [memoryview(struct.pack("<Q", len(text)) + text), *(v for v in views if len(v))]


def header_length(name: str, prefix: bytes, file_bytes: int, limit: int) -> int:
    """The header length the file's first 8 bytes declare, checked against the file and `limit`."""
    (n,) = struct.unpack("<Q", prefix)
    if n > min(file_bytes - 8, limit):
        raise CheckpointCorruptError(
            f"{name}: header length {n} exceeds the file ({file_bytes} bytes) or the limit of "
            f"{limit}"
        )
    return n


Entry = tuple[int, int, str, torch.dtype, list[int]]


def parse_header(name: str, text: bytes, data_len: int) -> list[Entry]:
    """Validate a safetensors header as strictly as the safetensors library does.

    Returns the entries ``(begin, end, key, dtype, shape)`` sorted by offset, which tile the
    `data_len` bytes of data after the header exactly.
    """
    check_json_cost(name, text)
    try:
        if not text.startswith(b"{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(
            text.decode("utf-8"),
            object_pairs_hook=unique_keys(name),
            parse_constant=no_constants(name),
        )
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not an object of strings")
        entries = sorted(_entry(key, info) for key, info in header.items())
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointCorruptError):
            raise
        raise CheckpointCorruptError(
            f"{name}: not a valid safetensors file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    end = 0
    for begin, stop, key, _, _ in entries:
        if begin != end:
            raise CheckpointCorruptError(
                f"{name}: tensor {key[:100]!r} starts at byte {begin} of the data, expected {end} "
                "(gap or overlap)"
            )
        end = stop
    if end != data_len:
        raise CheckpointCorruptError(
            f"{name}: the tensors cover {end} bytes of data, the file holds {data_len}"
        )
    return entries


def tensors_of(entries: list[Entry], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a parsed header as views of `data` (the bytes after the header, uint8)."""
    array = data.numpy()
    tensors = {}
    for begin, stop, key, dtype, shape in entries:
        size = dtype.itemsize
        if stop == begin:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif (data.data_ptr() + begin) % size == 0:
            tensors[key] = torch.frombuffer(
                array, dtype=dtype, count=(stop - begin) // size, offset=begin
            ).view(shape)
        # misaligned (never written so, but valid): copy rather than hand kernels a misaligned view
        else:
            tensors[key] = torch.frombuffer(bytearray(array[begin:stop]), dtype=dtype).view(shape)
    return tensors


def _entry(key: str, info: Any) -> tuple[int, int, str, torch.dtype, list[int]]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(
            f"tensor {key[:100]!r}: expected dtype, shape and data_offsets, got {str(info)[:100]}"
        )
    dtype, shape, offsets = (
        DTYPE_OF.get(info["dtype"]) if isinstance(info["dtype"], str) else None,
        info["shape"],
        info["data_offsets"],
    )
    if dtype is None:
        raise ValueError(f"tensor {key[:100]!r}: unsupported dtype {str(info['dtype'])[:20]!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and 0 <= d <= MAX_SPAN for d in shape)
    ):
        raise ValueError(
            f"tensor {key[:100]!r}: invalid shape {str(shape)[:100]} (dimensions are ints in [0, "
            f"2**62], at most {MAX_RANK} of them)"
        )
    if span_of(shape) > MAX_SPAN:
        raise ValueError(
            f"tensor {key[:100]!r}: shape {str(shape)[:100]} spans more than 2**62 elements"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"tensor {key[:100]!r}: invalid data_offsets {str(offsets)[:100]}")
    if _nbytes(shape, dtype.itemsize, limit=offsets[1] - offsets[0]) != offsets[1] - offsets[0]:
        raise ValueError(
            f"tensor {key[:100]!r}: shape {str(shape)[:100]} does not fit "
            f"{offsets[1] - offsets[0]} bytes"
        )
    return offsets[0], offsets[1], key, dtype, shape


def span_of(shape: list[int]) -> int:
    """The product of the dimensions, zeros counted as 1, or MAX_SPAN + 1 once that is exceeded."""
    n = 1
    for d in shape:
        n *= max(d, 1)
        if n > MAX_SPAN:
            return MAX_SPAN + 1
    return n


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """Bytes of a tensor of `shape`, or `limit` + 1 once that is exceeded (no huge products)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def json_cost(text: bytes | bytearray) -> int:
    """An upper bound on the memory `json.loads` takes to parse `text` (with the hooks used here).

    Counted from the structural characters, which bound how many Python objects the parse makes:
    an object per ``{`` (a dict and its list of pairs), ``[`` (a list), ``,`` (a value and its
    slot) and ``:`` (a key string and its dict entry); and 8 bytes a character: the decoded text and
    the strings parsed from it each store every character in 4 bytes when one of them is astral.
    """
    count = text.count
    return (
        8 * len(text)
        + 88 * count(b"{")
        + 80 * count(b"[")
        + 72 * count(b",")
        + 168 * count(b":")
        + 4096
    )


def check_json_cost(name: str, text: bytes | bytearray, limit: int | None = None) -> None:
    """Refuse `text` before parsing when parsing it could take more than `limit` bytes of memory."""
    limit = MAX_JSON_MEMORY if limit is None else limit
    cost = json_cost(text)
    if cost > limit:
        raise CheckpointCorruptError(
            f"{name}: parsing its {len(text)} bytes of JSON could take {cost >> 20} MiB of memory, "
            f"over the limit of {limit >> 20} MiB (a real checkpoint's JSON takes 4 to 10 times "
            "its size; this one is made of tiny containers)"
        )


def unique_keys(name: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON ``object_pairs_hook`` refusing a key repeated in an object of file `name`."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointCorruptError(f"{name}: duplicate key {k[:100]!r}")
            out[k] = v
        return out

    return hook


def no_constants(name: str) -> Callable[[str], Any]:
    """A JSON ``parse_constant`` refusing ``NaN`` and ``Infinity`` in file `name`."""

    def hook(constant: str) -> Any:
        raise CheckpointCorruptError(f"{name}: non-standard JSON constant {constant}")

    return hook


def finite_float(name: str) -> Callable[[str], float]:
    """A JSON ``parse_float`` refusing a number that overflows to infinity in file `name`."""

    def hook(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise CheckpointCorruptError(f"{name}: number {text[:50]} is out of range")
        return value

    return hook
