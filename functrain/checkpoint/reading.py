"""Reading a checkpoint's tensor files: whole, or a few tensors, into memory of the load's own.

A load of a plain checkpoint reads each file whole, its digest over every byte. A rank of a
sharded load (`functrain.checkpoint.sharded`) needs only the shards that overlap its own part of
each tensor: it reads those tensors' bytes alone, each checked against the digest the manifest
records for it. Either way the file's size and header are checked against the manifest first,
before anything the size of the data is read or allocated, and the bytes are hashed in the pass
that reads them. The tensors are views of that memory, never of the files: what was verified stays
as it was verified, whatever happens to the files after the load (rewritten in place as ``cp`` or
``rsync --inplace`` do, truncated), and writing into a loaded tensor never reaches a file.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from functrain.checkpoint.files import (
    SPELLED,
    digest_of,
    digest_of_range,
    holes_in,
    open_regular,
    read_exactly,
    read_hashed,
)
from functrain.checkpoint.tensorfile import (
    MAX_HEADER_BYTES,
    Entry,
    bytes_of,
    header_length,
    parse_header,
    tensors_of,
)
from functrain.errors import CheckpointCorruptError


def _header_bound(index: Mapping[str, Any]) -> int:
    """The longest safetensors header a file's listed tensors can justify (every key escaped)."""
    justified = sum(
        6 * len(key.encode("utf-8", "surrogatepass")) + 128 + 21 * len(info["shape"])
        for key, info in index.items()
    )
    return min(MAX_HEADER_BYTES, 4096 + 2 * justified)


def _read_tensor_file(
    path: Path, info: Mapping[str, Any], algorithm: str, index: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A tensor file's tensors, checked against the manifest, every byte hashed once.

    The header is read and checked against the manifest's `index` (this file's entries) before
    anything the size of the data is allocated. Then the whole file is read into one buffer of its
    own, hashed as it is read; the tensors are views of that buffer. A file with holes where its
    data should be is hashed through a small buffer first (`_check_holes`).
    """
    name = path.name
    fd, size = open_regular(path, name)
    try:
        head, entries = read_header(fd, size, name, info, index)
        _check_holes(fd, 0, len(head), size, name, algorithm, info[algorithm])
        whole, digest = read_hashed(fd, 0, size, name, algorithm)
    except OSError as e:
        raise CheckpointCorruptError(f"{name}: cannot be read ({e})") from None
    finally:
        os.close(fd)
    if digest != info[algorithm]:
        raise CheckpointCorruptError(
            f"{name}: {SPELLED[algorithm]} digest does not match the manifest (the file is corrupt)"
        )
    if whole[: len(head)].numpy().tobytes() != head:  # the header judged above is the one hashed
        raise CheckpointCorruptError(f"{name}: changed while it was read")
    return tensors_of(entries, whole[len(head) :])


def read_header(
    fd: int, size: int, name: str, info: Mapping[str, Any], index: Mapping[str, Any]
) -> tuple[bytearray, list[Entry]]:
    """The file's bytes before its data, and its entries, checked against `info` and `index`."""
    _check_recorded_size(name, size, info["bytes"])
    if size < 8:
        raise CheckpointCorruptError(f"{name}: {size} bytes, too short for a safetensors file")
    head = read_exactly(fd, 8, name)
    n = header_length(name, bytes(head), size, _header_bound(index))
    head += read_exactly(fd, n, name)
    entries = parse_header(name, bytes(head[8:]), size - 8 - n)
    _check_entries(name, entries, index)
    return head, entries


def read_tensors(
    path: Path, info: Mapping[str, Any], index: Mapping[str, Any], wanted: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Some tensors of a tensor file, each checked against its own BLAKE3 digest.

    What a rank of a sharded load reads: the file's size and header are checked against the
    manifest (`info`, `index`: this file's entries) as for a whole read, then the bytes of each
    tensor in `wanted` (key -> the digest the manifest records for it) are read alone into a buffer
    of its own and hashed as they are read: only their pages are read from the disk.

    Raises:
        CheckpointCorruptError: the file is missing, of another size, its header does not match
            the manifest, or a tensor's bytes do not match its digest.
    """
    name = path.name
    fd, size = open_regular(path, name)
    tensors: dict[str, torch.Tensor] = {}
    try:
        head, entries = read_header(fd, size, name, info, index)
        for begin, stop, key, dtype, shape in entries:
            if key not in wanted:
                continue
            at = len(head) + begin
            _check_holes(fd, at, at, len(head) + stop, name, "blake3", wanted[key], key)
            data, digest = read_hashed(fd, at, stop - begin, name, "blake3")
            if digest != wanted[key]:
                raise CheckpointCorruptError(
                    f"{name}: the BLAKE3 digest of tensor {key[:100]!r} does not match the "
                    "manifest (the file is corrupt)"
                )
            tensors |= tensors_of([(0, stop - begin, key, dtype, shape)], data)
    except OSError as e:
        raise CheckpointCorruptError(f"{name}: cannot be read ({e})") from None
    finally:
        os.close(fd)
    return tensors


def _check_holes(
    fd: int,
    hashed_from: int,
    start: int,
    stop: int,
    name: str,
    algorithm: str,
    expected: str,
    key: str | None = None,
) -> None:
    """Before a read allocates memory for bytes `start` to `stop`: if they have holes, verify first.

    A hole has no disk blocks and reads as zeros: a crafted file can declare gigabytes it does not
    hold, and its digest refuses it only once every byte is read. So where a file has holes, the
    bytes from `hashed_from` to `stop` are hashed through a small buffer, and refused before
    anything their size is allocated; an honest file with holes (zeros left sparse by a copy, or
    by a file system that compresses) is then read as any other, its cost one more pass over the
    bytes. A dense file costs one ``fstat``.
    """
    if not holes_in(fd, start, stop):
        return
    if digest_of_range(fd, hashed_from, stop - hashed_from, name, algorithm) != expected:
        what = (
            f"the BLAKE3 digest of tensor {key[:100]!r}" if key else f"{SPELLED[algorithm]} digest"
        )
        raise CheckpointCorruptError(
            f"{name}: has holes where its data should be (no disk blocks), and {what} does not "
            "match the manifest (the file is corrupt or crafted); refused before its "
            f"{stop - start} bytes were allocated"
        )


def _check_entries(name: str, entries: list[Any], index: Mapping[str, Mapping[str, Any]]) -> None:
    """A file's header lists exactly the tensors the manifest's index places in it, as recorded."""
    held = {key: (str(dtype).removeprefix("torch."), shape) for _, _, key, dtype, shape in entries}
    missing, extra = sorted(set(index) - set(held)), sorted(set(held) - set(index))
    if missing:
        raise CheckpointCorruptError(
            f"{name}: does not hold tensors {missing[:10]}, which the manifest lists in it"
        )
    if extra:
        raise CheckpointCorruptError(
            f"{name}: holds tensors the manifest does not list in it: {extra[:10]}"
        )
    for key, (dtype, shape) in held.items():
        if [index[key]["dtype"], index[key]["shape"]] != [dtype, shape]:
            raise CheckpointCorruptError(
                f"{name}: tensor {key[:100]!r} is {shape} {dtype}, the manifest records "
                f"{str(index[key])[:200]}"
            )


# ---------------------------------------------------------------------------------------------
# a checkpoint's tensors, whole or by rows


Rows = Mapping[str, tuple[int, int]]


def index_by_file(
    index: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Mapping[str, Any]]]:
    """Each file's entries, key -> ``{"dtype", "shape"}``; a shard's shape is its extent."""
    by_file: dict[str, dict[str, Mapping[str, Any]]] = {}
    for key, info in index.items():
        if "shards" in info:
            for shard in info["shards"]:
                by_file.setdefault(shard["file"], {})[key] = {
                    "dtype": info["dtype"],
                    "shape": shard["extent"],
                }
        else:
            by_file.setdefault(info["file"], {})[key] = info
    return by_file


def _overlaps(shard: Mapping[str, Any], span: tuple[int, int]) -> bool:
    lo = shard["offset"][0]
    return lo < span[1] and lo + shard["extent"][0] > span[0]


def plan(
    index: Mapping[str, Mapping[str, Any]], files: Mapping[str, Any], rows: Rows
) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The files to read whole, and ``file -> {key: digest}`` of the shards to read alone.

    A tensor without `rows` comes from whole files (every shard of it); one with `rows` from the
    shards that overlap them (a plain tensor's file is read whole: it has no digest per tensor).
    A file no entry names is read whole too (it must then hold nothing: its header is checked).
    """
    whole: set[str] = set()
    for key, info in index.items():
        if "shards" not in info:
            whole.add(info["file"])
        elif key not in rows:
            whole.update(shard["file"] for shard in info["shards"])
    some: dict[str, dict[str, str]] = {}
    for key, span in rows.items():
        for shard in index[key].get("shards", ()):
            if shard["file"] not in whole and _overlaps(shard, span):
                some.setdefault(shard["file"], {})[key] = shard["blake3"]
    referenced = set(index_by_file(index))
    return whole | (set(files) - referenced), some


def read_all(
    file_at: Callable[[str], Path],
    manifest: Mapping[str, Any],
    algorithm: str,
    rows: Rows,
    check_memory: Callable[[int, int], None],
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, keyed by its path: whole, or only the `rows` asked for.

    Each file is read once: whole (its digest over every byte, and each shard in it checked
    against its own digest too, so that a checkpoint that verifies also loads by shards), or only
    the shards needed, each verified alone.
    """
    index, files = manifest["tensors"], manifest["files"]
    whole, some = plan(index, files, rows)
    by_file = index_by_file(index)
    on_disk = 0
    for name in whole | set(some):  # a manifest that lies about sizes is corrupt, not too large
        on_disk += _check_size(file_at(name), files[name]["bytes"])
    check_memory(
        sum(files[name]["bytes"] for name in whole)
        + sum(_shard_bytes(index[key], file) for file, keys in some.items() for key in keys),
        on_disk,
    )
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name in files:
        if name in whole:
            loaded[name] = _read_tensor_file(
                file_at(name), files[name], algorithm, by_file.get(name, {})
            )
            _check_shard_digests(name, loaded[name], index)
        elif name in some:
            loaded[name] = read_tensors(
                file_at(name), files[name], by_file.get(name, {}), some[name]
            )
    return {key: _assemble(key, info, rows.get(key), loaded) for key, info in index.items()}


def _check_size(path: Path, recorded: int) -> int:
    """The file at `path` has the size the manifest records (checked again once it is open).

    Returns the bytes its disk blocks hold (less than its size where it has holes); a file that is
    not a regular one is left to the open, which says so.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path.name}: missing from the checkpoint") from None
    except OSError:
        return recorded  # the open says why
    if not stat.S_ISREG(st.st_mode):
        return recorded
    _check_recorded_size(path.name, st.st_size, recorded)
    return min(recorded, st.st_blocks * 512)


def _check_recorded_size(name: str, size: int, recorded: int) -> None:
    if size != recorded:
        raise CheckpointCorruptError(
            f"{name}: {size} bytes, the manifest records {recorded} (truncated or replaced)"
        )


def _shard_bytes(info: Mapping[str, Any], file: str) -> int:
    extent = next(shard["extent"] for shard in info["shards"] if shard["file"] == file)
    return math.prod(extent) * getattr(torch, info["dtype"]).itemsize


def _check_shard_digests(
    name: str, tensors: Mapping[str, torch.Tensor], index: Mapping[str, Mapping[str, Any]]
) -> None:
    for key, t in tensors.items():
        digest = next(
            (shard["blake3"] for shard in index[key].get("shards", ()) if shard["file"] == name),
            None,
        )
        if digest is not None and digest_of("blake3", bytes_of(t.contiguous()), True) != digest:
            raise CheckpointCorruptError(
                f"{name}: the BLAKE3 digest of tensor {key[:100]!r} does not match the manifest "
                "(the file is corrupt)"
            )


def _assemble(
    key: str,
    info: Mapping[str, Any],
    span: tuple[int, int] | None,
    loaded: Mapping[str, Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """The tensor at `key`, or its rows `span`, from the pieces read."""
    if "shards" not in info:
        t = loaded[info["file"]][key]
        return t if span is None else t[span[0] : span[1]].clone()
    shape = info["shape"]
    start, stop = span if span is not None else (0, shape[0])
    parts = []
    for shard in info["shards"]:
        if _overlaps(shard, (start, stop)):
            lo, t = shard["offset"][0], loaded[shard["file"]][key]
            parts.append((t, max(start, lo) - lo, min(stop, lo + shard["extent"][0]) - lo))
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].shape[0]:
        return parts[0][0]  # one whole shard: as read, no copy
    if not parts:
        return torch.empty([stop - start, *shape[1:]], dtype=getattr(torch, info["dtype"]))
    return torch.cat([t[a:b] for t, a, b in parts])
