"""How a state tree becomes files, and back: safe (no pickle), atomic, self-verifying.

A checkpoint is a directory::

    manifest.json              written last; describes everything below, and seals itself
    tensors-00000.safetensors  the tree's tensors, keyed by their tree path (a new file every
                               2 GiB or 50,000 tensors)

The manifest holds the format version, the library versions, the tree's structure with every
non-tensor leaf encoded exactly (NaN, Inf and integers of any size round-trip), the index of the
tensors (file, dtype, shape of each), a digest and size per file, a fingerprint of the static parts,
and the user's metadata. Its first field seals it: the digest of the manifest's own bytes with that
field's 64 hex digits written as zeros.

Format versions, all still read:

* 5 (written for a tree holding a sparse COO tensor: SGD's momentum of ``nn.Embedding(sparse=True)``
  weights): format 3, and a structure node ``{"sparse_coo": {...}}`` naming the tensor's
  ``indices`` and ``values`` (two tensors of the files, keyed ``<path>/indices`` and
  ``<path>/values``), its dense ``shape`` and whether it is ``coalesced``. A load rebuilds it with
  torch's invariant checks (every index within the shape; a tensor said to be coalesced is), and
  its rows in their saved order: an uncoalesced tensor's order is the order its rows are summed in.
* 4 (written for sharded states, `functrain.checkpoint.sharded`): format 3, and tensors kept as
  shards, each rank's in files of its own: a sharded tensor's index entry lists each shard's file,
  offset, extent and BLAKE3 digest, so a reader can read and verify only the shards it needs.
* 3 (written for every other tree): BLAKE3 digests, ``"blake3"`` per file and ``manifest_blake3`` as
  the seal. BLAKE3 is a cryptographic hash, so a checkpoint can be pinned by its manifest digest
  (``read_tree(path, digest=...)``, `verify`, ``functrain.load``): the manifest's digest covers
  every file's digest, so nothing of a pinned checkpoint can change.
* 2: SHA-256 digests, ``"sha256"`` per file and ``manifest_sha256`` as the seal.
* 1: SHA-256 digests per file; the manifest has no seal.

A save writes into a temporary directory beside the target, fsyncs each file, writes and fsyncs the
manifest, fsyncs the directory, swaps it into place (`functrain.checkpoint.commit`: one atomic
``renameat2`` exchange where the OS has it) and fsyncs the parent: a process killed at any instant
leaves the previous checkpoint or the new one, complete. Readers ignore temporary directories (names
starting with ``.tmp-``), but for the displaced copy of a checkpoint that two renames replace
(where the OS has no exchange; `functrain.checkpoint.commit`).

Speed: every byte is hashed in the one pass that writes or reads it. A save copies each piece of
the tensors' memory into a small buffer of its own, hashes it there in a second thread and writes
it from there (so a file's digest is of the bytes it holds, even if the tensors are written
meanwhile), and has the disk start writing back each piece at once (``sync_file_range``), so the
hash and the copies hide behind the disk. A load reads each tensor file into memory of its own
(its pages all provided at once), hashed in a second thread as it is read; the tensors are
writable views of that memory, never of the file: what a load verified stays as verified, whatever
is later done to the file (rewritten in place, truncated).

A checksum is not a signature: a load assumes the manifest may have been re-sealed by whoever
wrote the files, and bounds what any file can cost before trusting it. Loading never calls pickle
or `torch.load`; every file is opened without following links or blocking and must be a regular
file (checked on what was opened); the manifest is at most 64 MiB, and JSON (the manifest, a
header) is refused before parsing when its parse could take over 512 MiB; the index's dtypes,
ranks and dimensions are bounded; a tensor file's header is read and checked against the index
before its data is allocated, the files together must fit in the machine's memory, and an
allocation that fails is a `CheckpointCorruptError` like any other malformed file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import orjson
import torch

from functrain.checkpoint.commit import TMP_PREFIX, commit, not_written, temporary
from functrain.checkpoint.files import (
    DENIED,
    SPELLED,
    available_memory,
    digest_of,
    fsync_dir,
    hasher,
    open_regular,
    permission_error,
    read_exactly,
    wait_for_removals,
    write_file,
)
from functrain.checkpoint.reading import read_all
from functrain.checkpoint.tensorfile import (
    CODE_OF,
    DTYPE_OF,
    MAX_RANK,
    MAX_SPAN,
    check_json_cost,
    finite_float,
    no_constants,
    safetensors_chunks,
    span_of,
    unique_keys,
)
from functrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMemoryError,
    CheckpointPermissionError,
    CheckpointVanishedError,
)
from functrain.layout import sparse_coo
from functrain.tree import Tree, leaves_by_path
from functrain.tree import escape_key as _escape

__all__ = [
    "FORMAT_VERSION",
    "PLAIN_FORMAT_VERSION",
    "SHARDED_FORMAT_VERSION",
    "SPARSE_FORMAT_VERSION",
    "write_tree",
    "read_tree",
    "read_manifest",
    "verify",
    "is_checkpoint",
    "TMP_PREFIX",
    "MANIFEST",
    "TreeWriter",
    "build_manifest",
    "json_extras",
    "write_manifest",
    "write_tensor_files",
    "committed",
]

FORMAT_VERSION = (
    5  # the newest this functrain reads; plain trees are written as PLAIN_FORMAT_VERSION
)
PLAIN_FORMAT_VERSION = 3
SHARDED_FORMAT_VERSION = 4  # what a sharded state is written as
SPARSE_FORMAT_VERSION = 5  # what a tree holding a sparse tensor is written as
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
MAX_FILES = 4096
MAX_TENSORS = 1_000_000
SHARD_BYTES = 2 << 30
SHARD_TENSORS = 50_000  # keeps a file's header far under what its parse may cost (MAX_JSON_MEMORY)
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# the digest of each format version's files and manifest: SHA-256 up to 2, BLAKE3 from 3 on
_ALGORITHM = {1: "sha256", 2: "sha256", 3: "blake3", 4: "blake3", 5: "blake3"}
_SEALS = {
    algorithm: f'{{\n  "manifest_{algorithm}": "'.encode() for algorithm in ("sha256", "blake3")
}


# ---------------------------------------------------------------------------------------------
# encoding the structure


def _encode_leaf(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {"none": True}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        # as a decimal string: exact at any size, and no JSON reader can round it
        try:
            return {"int": int.__repr__(value)}
        except ValueError:
            raise CheckpointError(
                f"cannot save the int at {path!r}: it has over 4300 digits; store it as a str"
            ) from None
    if isinstance(value, float):
        # float.hex() spells every NaN "nan"; the sign at least can be kept
        negative_nan = math.isnan(value) and math.copysign(1.0, value) < 0
        return {"float": "-nan" if negative_nan else float.hex(value)}
    if isinstance(value, str):
        _check_utf8(value, path)
        return {"str": value}
    raise CheckpointError(
        f"cannot save the leaf at {path!r}: expected a tensor, None, bool, int, float or str, got "
        f"{type(value).__name__}; store it as a tensor or in `metadata`"
    )


def _check_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"cannot save {text[:50]!r} at {path!r}: not valid UTF-8 (a lone surrogate)"
        ) from None


def _decode_leaf(node: Mapping[str, Any], path: str) -> Any:
    try:
        if "none" in node:
            return None
        if "bool" in node and isinstance(node["bool"], bool):
            return node["bool"]
        if "int" in node and isinstance(node["int"], str) and len(node["int"]) <= 4301:
            return int(node["int"])
        if "float" in node and isinstance(node["float"], str) and len(node["float"]) <= 64:
            return float.fromhex(node["float"])
        if "str" in node and isinstance(node["str"], str):
            return node["str"]
    except (ValueError, OverflowError):  # OverflowError: a float beyond float64's range
        pass
    raise CheckpointCorruptError(f"{MANIFEST}: malformed leaf at {path!r}: {str(node)[:200]}")


class TreeWriter:
    """Walks a tree, collecting tensors by path and describing the structure as JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()
        self.sparse = False  # whether a sparse tensor was met: the tree is then format 5

    @property
    def version(self) -> int:
        """The format version of the tree walked: `SPARSE_FORMAT_VERSION` where it holds a
        sparse tensor, `PLAIN_FORMAT_VERSION` otherwise."""
        return SPARSE_FORMAT_VERSION if self.sparse else PLAIN_FORMAT_VERSION

    def node(self, tree: Any, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"the tree is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if isinstance(tree, torch.Tensor) and tree.layout == torch.sparse_coo:
            self.sparse = True
            t = tree.detach()
            keys = _join(path, "indices"), _join(path, "values")
            self.tensors[keys[0]] = self._detached(t._indices(), path)
            self.tensors[keys[1]] = self._detached(t._values(), path)
            return {
                "sparse_coo": {
                    "indices": keys[0],
                    "values": keys[1],
                    "shape": list(t.shape),
                    "coalesced": t.is_coalesced(),
                }
            }
        if isinstance(tree, torch.Tensor):
            self.tensors[path] = self._detached(tree, path)
            return {"tensor": path}
        if isinstance(tree, dict):
            bad = [k for k in tree if not isinstance(k, str)]
            if bad:
                raise CheckpointError(
                    f"dict keys must be str to be saved, got {bad[:5]} at {path!r}"
                )
            for k in tree:
                _check_utf8(k, path)
            return {
                "dict": {
                    k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in tree.items()
                }
            }
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            cls = type(tree)
            fields = {
                f: self.node(getattr(tree, f), _join(path, f), depth + 1) for f in tree._fields
            }
            return {"namedtuple": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
        if isinstance(tree, (tuple, list)):
            kind = "tuple" if isinstance(tree, tuple) else "list"
            return {
                kind: [self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(tree)]
            }
        return {"leaf": _encode_leaf(tree, path)}

    def _detached(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if t.dtype not in CODE_OF or t.layout != torch.strided or t.device.type == "meta":
            raise CheckpointError(
                f"cannot save the tensor at {path!r}: {t.dtype} {t.layout} on {t.device}; dense "
                "tensors on a real device of these dtypes can be saved (the format's tensor "
                f"files are safetensors'): {sorted(str(d) for d in CODE_OF)}; hold a complex "
                "weight as two real tensors (torch.view_as_real) in the module, a sparse CSR "
                "buffer as COO (.to_sparse()); nothing was written"
            )
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # tensors that share memory are written once each; a counter reused across fields is one
        shared = key in self._storages and t.numel() > 0
        self._storages.add(key)
        if (
            shared
            or not t.is_contiguous()
            or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        ):
            t = t.clone(memory_format=torch.contiguous_format)
        return t


def file_digests(tree: Tree) -> dict[str, str]:
    """The digest of each tensor file `write_tree` would write for `tree` now, by file name.

    Example:
        >>> import tempfile
        >>> tree = {"w": torch.ones(2)}
        >>> digests = file_digests(tree)
        >>> d = write_tree(Path(tempfile.mkdtemp()) / "ckpt", tree)
        >>> read_tree(d)[1]["files"]["tensors-00000.safetensors"]["blake3"] == digests[
        ...     "tensors-00000.safetensors"
        ... ]
        True
    """
    writer = TreeWriter()
    writer.node(tree, "", 0)
    return tensor_file_digests("tensors", writer.tensors)


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


class _Reader:
    def __init__(
        self, tensors: Mapping[str, torch.Tensor], named_types: Mapping[str, type] | None
    ) -> None:
        self.tensors = tensors
        self.named_types = named_types or {}
        self.used: dict[str, str] = {}  # tensor key -> the tree path that named it

    def node(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CheckpointCorruptError(
                f"{MANIFEST}: structure nested deeper than {MAX_DEPTH} levels at {path!r}"
            )
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise CheckpointCorruptError(f"{MANIFEST}: malformed structure node at {path!r}")
        if "tensor" in node:
            return self._tensor(node["tensor"], path)
        if "sparse_coo" in node and isinstance(node["sparse_coo"], dict):
            return self._sparse(node["sparse_coo"], path)
        if "dict" in node and isinstance(node["dict"], dict):
            return {
                k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in node["dict"].items()
            }
        if (
            "namedtuple" in node
            and isinstance(node["namedtuple"], str)
            and isinstance(node.get("fields"), dict)
        ):
            fields = {k: self.node(v, _join(path, k), depth + 1) for k, v in node["fields"].items()}
            cls = self.named_types.get(node["namedtuple"])
            try:
                return cls(**fields) if cls is not None else fields
            except TypeError as e:
                raise CheckpointCorruptError(
                    f"{MANIFEST}: the fields at {path!r} do not fit {node['namedtuple']}: {e}"
                ) from None
        for kind, make in (("tuple", tuple), ("list", list)):
            if kind in node and isinstance(node[kind], list):
                return make(
                    self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(node[kind])
                )
        if "leaf" in node and isinstance(node["leaf"], dict):
            return _decode_leaf(node["leaf"], path)
        raise CheckpointCorruptError(
            f"{MANIFEST}: unknown structure node at {path!r}: {str(node)[:200]}"
        )

    def _tensor(self, key: Any, path: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise CheckpointCorruptError(
                f"{MANIFEST}: tensor {str(key)[:100]!r} at {path!r} is in no tensor file"
            )
        if key in self.used:
            # a save writes each leaf under its own key: two paths of one tensor would load
            # as two leaves sharing memory, which a step writing in place would corrupt
            raise CheckpointCorruptError(
                f"{MANIFEST}: tensor {key[:100]!r} is named at {self.used[key][:100]!r} and "
                f"again at {path[:100]!r}; each path of a saved tree has a tensor of its own"
            )
        self.used[key] = path
        return self.tensors[key]

    def _sparse(self, node: Mapping[str, Any], path: str) -> torch.Tensor:
        """A sparse COO tensor (format 5), checked by torch's invariants as it is rebuilt."""
        shape, coalesced = node.get("shape"), node.get("coalesced")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(coalesced, bool)
        ):
            raise CheckpointCorruptError(
                f"{MANIFEST}: malformed sparse tensor at {path!r}: {str(node)[:200]}"
            )
        indices = self._tensor(node.get("indices"), path)
        values = self._tensor(node.get("values"), path)
        if indices.dtype != torch.int64:  # torch would take (and truncate) other dtypes
            raise CheckpointCorruptError(
                f"{MANIFEST}: the sparse tensor at {path!r} has indices of {indices.dtype}; the "
                "format holds them as torch.int64"
            )
        try:
            return sparse_coo(indices, values, shape, check=True, coalesced=coalesced)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointCorruptError(
                f"{MANIFEST}: the sparse tensor at {path!r} is malformed: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None


# ---------------------------------------------------------------------------------------------
# writing


def _shards(tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and (size + nbytes > SHARD_BYTES or len(shards[-1]) >= SHARD_TENSORS):
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _sealed(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's bytes, its first field the BLAKE3 of those bytes with that field zeroed."""
    raw = orjson.dumps({"manifest_blake3": "0" * 64, **manifest}, option=orjson.OPT_INDENT_2)
    seal = _SEALS["blake3"]
    assert raw.startswith(seal)
    try:  # never write what a load would refuse
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(
                f"{MANIFEST}: {len(raw)} bytes, over the limit of {MAX_MANIFEST_BYTES}"
            )
        check_json_cost(MANIFEST, raw)
    except CheckpointCorruptError as e:
        raise CheckpointError(
            f"cannot save this tree: {e}; keep large data in tensors rather than in plain leaves "
            "or metadata"
        ) from None
    return raw[: len(seal)] + blake3.blake3(raw).hexdigest().encode() + raw[len(seal) + 64 :]


def json_extras(
    fingerprint: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The manifest's ``fingerprint`` and ``metadata``, checked to be JSON with finite numbers."""
    extras = {"fingerprint": fingerprint or {}, "metadata": metadata or {}}
    for name, value in extras.items():
        if not isinstance(value, Mapping):  # a load refuses a manifest whose field is not a dict
            raise CheckpointError(
                f"{name} must be a dict of JSON values or None, got {type(value).__name__} "
                f"{str(value)[:80]}"
            )
    try:
        encoded = orjson.dumps(extras)
        _refuse_nonfinite(extras, "")  # orjson would write them as null
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            "fingerprint and metadata must be JSON-able (str keys; str, finite numbers, bool, "
            f"None, lists, dicts): {e}"
        ) from e
    return json.loads(encoded)


def _refuse_nonfinite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}; keep non-finite numbers in the tree, or as str")
    items = (
        value.items()
        if isinstance(value, Mapping)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    for k, v in items:
        _refuse_nonfinite(v, f"{path}/{k}" if path else str(k))


def _tensor_files(
    prefix: str, tensors: Mapping[str, torch.Tensor], empty: bool
) -> Iterator[tuple[str, dict[str, torch.Tensor], list[memoryview]]]:
    """The tensor files `tensors` make: ``(name, its tensors, its bytes as buffers in order)``.

    With no tensors, one empty file where `empty` (a plain tree's checkpoint always has a tensor
    file), none otherwise.
    """
    for i, shard in enumerate(_shards(tensors)):
        if shard or empty:
            yield f"{prefix}-{i:05d}.safetensors", shard, safetensors_chunks(shard)


def tensor_file_digests(
    prefix: str, tensors: Mapping[str, torch.Tensor], *, empty: bool = True
) -> dict[str, str]:
    """The BLAKE3 digest of each file `write_tensor_files` would write for `tensors` now, by name.

    What an async save records before `save()` returns (`functrain.checkpoint.snapshot`): the
    files it later writes must have these digests, or the tensors changed in between.
    """
    digests = {}
    for name, _, chunks in _tensor_files(prefix, tensors, empty):
        digest = hasher("blake3", threads=True)
        for chunk in chunks:
            digest.update(chunk)
        digests[name] = str(digest.hexdigest())
    return digests


def write_tensor_files(
    tmp: Path,
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    files: dict[str, Any],
    index: dict[str, Any],
    *,
    empty: bool = True,
    check_file: Callable[[str, str], None] | None = None,
) -> None:
    """Write `tensors` as ``<prefix>-NNNNN.safetensors`` files in `tmp`, noted in `files`, `index`.

    With no tensors, one empty file is written where `empty` (a plain tree's checkpoint always has a
    tensor file), none otherwise. `check_file` is called with each file's name and digest once it
    is written; what it raises aborts the save.
    """
    for name, shard, chunks in _tensor_files(prefix, tensors, empty):
        digest = write_file(tmp / name, chunks)
        if check_file is not None:
            check_file(name, digest)
        files[name] = {"blake3": digest, "bytes": sum(len(c) for c in chunks)}
        for key, t in shard.items():
            index[key] = {
                "file": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
            }


def build_manifest(
    version: int,
    structure: Any,
    index: Mapping[str, Any],
    files: Mapping[str, Any],
    extras: Mapping[str, Any],
    library_version: str,
) -> dict[str, Any]:
    """The manifest of a checkpoint of format `version`, before it is sealed."""
    return {
        "format": "functrain.checkpoint",
        "format_version": version,
        "functrain_version": library_version,
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        "structure": structure,
        "tensors": index,
        "files": files,
        "fingerprint": extras["fingerprint"],
        "metadata": extras["metadata"],
    }


def write_manifest(tmp: Path, manifest: Mapping[str, Any]) -> None:
    """Seal and write the manifest, then make the directory's entries (all its files) durable."""
    write_file(tmp / MANIFEST, _sealed(manifest))
    fsync_dir(tmp)


@contextmanager
def committed(tmp: Path, target: Path) -> Iterator[None]:
    """`commit` the checkpoint the block completes in `tmp`; if the block raises, remove `tmp`.

    Either way `target` holds a complete checkpoint: the new one, or what it held before. An
    `OSError`, of the block or of the commit, is raised as the `CheckpointError` of `not_written`.
    """
    try:
        try:
            yield
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit(tmp, target)
    except OSError as e:
        raise not_written(target, e) from e


def write_tree(
    directory: str | os.PathLike[str],
    tree: Tree,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    library_version: str = "",
    before_commit: Callable[[], None] | None = None,
    check_file: Callable[[str, str], None] | None = None,
    make_parent: bool = True,
) -> Path:
    """Write `tree` as a checkpoint directory at `directory`, atomically.

    Args:
        directory: the checkpoint's path. An existing checkpoint there is replaced only once the
            new one is complete.
        tree: nested dicts (str keys), lists, tuples and NamedTuples of tensors and of None, bool,
            int, float or str.
        fingerprint: JSON-able description of the static parts, compared when loading (a dict).
        metadata: JSON-able user data, a dict (floats NaN/Inf are refused here; keep those in the
            tree).
        library_version: recorded in the manifest.
        before_commit: called once every file is written and durable, before the checkpoint is
            put in place; what it raises aborts the save (nothing is committed).
        check_file: called with each tensor file's name and digest once it is written (an async
            save compares them with the `file_digests` it took earlier); what it raises aborts
            the save (nothing is committed).
        make_parent: create `directory`'s parent if missing; a `CheckpointManager` writes only
            into the directory it locked, so it passes False.

    Returns:
        The checkpoint's path.

    Raises:
        CheckpointError: the tree holds an unsupported leaf, the metadata is not JSON-able, or the
            write failed (the previous checkpoint at `directory`, if any, is left intact).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "ckpt"
        >>> _ = write_tree(d, {"w": torch.ones(2), "step": 3})
        >>> read_tree(d)[0]
        {'w': tensor([1., 1.]), 'step': 3}
    """
    target = Path(directory)
    wait_for_removals()  # the space of checkpoints deleted in the background comes back first
    writer = TreeWriter()
    structure = writer.node(tree, "", 0)
    extras = json_extras(fingerprint, metadata)
    tmp = temporary(target, make_parent)
    with committed(tmp, target):
        files: dict[str, dict[str, Any]] = {}
        index: dict[str, dict[str, Any]] = {}
        write_tensor_files(tmp, "tensors", writer.tensors, files, index, check_file=check_file)
        write_manifest(
            tmp,
            build_manifest(writer.version, structure, index, files, extras, library_version),
        )
        if before_commit is not None:
            before_commit()
    return target


# ---------------------------------------------------------------------------------------------
# reading


def _safe_file(directory: Path, name: Any) -> Path:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise CheckpointCorruptError(
            f"{MANIFEST}: refused file name {str(name)[:100]!r} (expected "
            "^[A-Za-z0-9._-]{1,200}$, no '..')"
        )
    return directory / name


def read_manifest(
    directory: str | os.PathLike[str], *, digest: str | None = None
) -> dict[str, Any]:
    """Read and validate a checkpoint's manifest (no tensor is loaded).

    Args:
        directory: the checkpoint's path.
        digest: the manifest digest to insist on (its ``manifest_blake3``, or ``manifest_sha256`` in
            format 2), recorded when the checkpoint was trusted: a manifest re-sealed since, with
            files swapped under it, is refused.

    Raises:
        CheckpointError: no checkpoint at `directory`, or one of a newer format version.
        CheckpointCorruptError: the manifest is too large, malformed, does not match its own digest,
            or not the `digest` asked for.
        CheckpointPermissionError: this process may not read it (naming the path and mode).
    """
    root = Path(directory)
    path = root / MANIFEST
    try:
        found = stat.S_ISDIR(os.stat(root).st_mode) and bool(os.lstat(path))
    except OSError as e:
        if e.errno in DENIED:  # not "no checkpoint": one this process may not read
            raise permission_error(path, e) from None
        found = False
    if not found:
        raise CheckpointError(
            f"no checkpoint at {str(root)!r}: expected a directory with {MANIFEST}"
        )
    fd, size = open_regular(path, MANIFEST)
    try:
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(
                f"{MANIFEST}: {size} bytes, over the limit of {MAX_MANIFEST_BYTES}"
            )
        raw = read_exactly(fd, size, MANIFEST)
    except OSError as e:
        raise CheckpointError(f"could not read {str(path)!r}: {e}") from None
    finally:
        os.close(fd)
    check_json_cost(MANIFEST, raw)
    algorithm, seal = _check_seal(raw)
    if digest is not None and seal != digest:
        raise CheckpointCorruptError(
            f"{MANIFEST}: its digest is {seal}, expected the pinned {str(digest)[:100]} (the "
            "checkpoint was replaced or re-sealed)"
        )
    try:
        manifest = json.loads(
            raw,
            object_pairs_hook=unique_keys(MANIFEST),
            parse_constant=no_constants(MANIFEST),
            parse_float=finite_float(MANIFEST),
        )
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointCorruptError):
            raise
        raise CheckpointCorruptError(
            f"{MANIFEST}: not valid JSON ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    _check_manifest(manifest, algorithm)
    return manifest


def _check_seal(raw: bytes | bytearray) -> tuple[str | None, str | None]:
    """``(algorithm, digest)`` of the manifest's seal, ``(None, None)`` without one.

    Raises if the seal does not match.
    """
    for algorithm, prefix in _SEALS.items():
        if raw.startswith(prefix):
            start, end = len(prefix), len(prefix) + 64
            recorded = raw[start:end].decode("ascii", "replace")
            if digest_of(algorithm, raw[:start] + b"0" * 64 + raw[end:]) != recorded:
                raise CheckpointCorruptError(
                    f"{MANIFEST}: its {SPELLED[algorithm]} digest does not match the "
                    f"manifest_{algorithm} it records (the file is corrupt)"
                )
            return algorithm, recorded
    return None, None


def _check_manifest(m: Any, sealed: str | None) -> None:
    if not isinstance(m, dict) or m.get("format") != "functrain.checkpoint":
        raise CheckpointCorruptError(f"{MANIFEST}: not a functrain checkpoint manifest")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointCorruptError(f"{MANIFEST}: invalid format_version {str(version)[:50]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this functrain reads (up to "
            f"{FORMAT_VERSION}); it was written by functrain {m.get('functrain_version')!r}: "
            "upgrade functrain to load it"
        )
    algorithm = _ALGORITHM[version]
    if version >= 2 and sealed != algorithm:
        raise CheckpointCorruptError(
            f"{MANIFEST}: format version {version} starts with its own digest, "
            f"manifest_{algorithm}; it is missing or damaged"
        )
    for key, kind in (
        ("structure", dict),
        ("tensors", dict),
        ("files", dict),
        ("fingerprint", dict),
        ("metadata", dict),
    ):
        if not isinstance(m.get(key), kind):
            raise CheckpointCorruptError(
                f"{MANIFEST}: field {key!r} missing or not a {kind.__name__}"
            )
    if len(m["files"]) > MAX_FILES or len(m["tensors"]) > MAX_TENSORS:
        raise CheckpointCorruptError(f"{MANIFEST}: too many files or tensors")
    for name, info in m["files"].items():
        digest = info.get(algorithm) if isinstance(info, dict) else None
        if (
            not isinstance(digest, str)
            or not _HEX64.match(digest)
            or type(info.get("bytes")) is not int
            or info["bytes"] < 0
        ):
            raise CheckpointCorruptError(
                f"{MANIFEST}: malformed entry for file {str(name)[:100]!r} (expected {algorithm} "
                "as 64 hex digits and bytes)"
            )
    for key, info in m["tensors"].items():
        if version >= 4 and isinstance(info, dict) and "shards" in info:
            _check_sharded_entry(key, info, m["files"])
        else:
            _check_index_entry(key, info, m["files"])


_DTYPE_NAMES = {str(dtype).removeprefix("torch.") for dtype in DTYPE_OF.values()}


def _check_index_entry(key: str, info: Any, files: Mapping[str, Any]) -> None:
    """An entry of the tensor index: its file is listed, its dtype known, its shape bounded."""
    where = f"{MANIFEST}: index entry for tensor {key[:100]!r}"
    if not isinstance(info, dict) or set(info) != {"file", "dtype", "shape"}:
        raise CheckpointCorruptError(
            f"{where}: expected file, dtype and shape, got {str(info)[:200]}"
        )
    if not isinstance(info["file"], str) or info["file"] not in files:
        raise CheckpointCorruptError(
            f"{where}: names file {str(info['file'])[:100]!r}, which the manifest does not list"
        )
    if info["dtype"] not in _DTYPE_NAMES:
        raise CheckpointCorruptError(f"{where}: unknown dtype {str(info['dtype'])[:50]!r}")
    shape = info["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and 0 <= d <= MAX_SPAN for d in shape)
        or span_of(shape) > MAX_SPAN
    ):
        raise CheckpointCorruptError(
            f"{where}: invalid shape {str(shape)[:100]} (at most {MAX_RANK} dimensions, ints whose "
            "product is at most 2**62)"
        )


def _check_sharded_entry(key: str, info: dict[str, Any], files: Mapping[str, Any]) -> None:
    """A sharded tensor's entry (format 4): its shards, in order, tile its first dimension."""
    where = f"{MANIFEST}: index entry for sharded tensor {key[:100]!r}"
    if (
        set(info) != {"dtype", "shape", "shards"}
        or not isinstance(info["shards"], list)
        or len(info["shards"]) > MAX_FILES
    ):
        raise CheckpointCorruptError(
            f"{where}: expected dtype, shape and a list of at most {MAX_FILES} shards, got "
            f"{str(info)[:200]}"
        )
    _check_index_entry(key, {"file": "", "dtype": info["dtype"], "shape": info["shape"]}, {"": {}})
    shape, end, seen = info["shape"], 0, set()
    for shard in info["shards"]:
        if not isinstance(shard, dict) or set(shard) != {"file", "offset", "extent", "blake3"}:
            raise CheckpointCorruptError(
                f"{where}: a shard must have file, offset, extent and blake3, got "
                f"{str(shard)[:200]}"
            )
        if (
            not isinstance(shard["file"], str)
            or shard["file"] not in files
            or shard["file"] in seen
        ):
            raise CheckpointCorruptError(
                f"{where}: a shard names file {str(shard['file'])[:100]!r}, which the manifest "
                "does not list or names twice"
            )
        seen.add(shard["file"])
        offset, extent = shard["offset"], shard["extent"]
        rest = [0] * (len(shape) - 1)
        if (
            not shape
            or offset != [end, *rest]
            or type(end) is not int
            or not isinstance(extent, list)
            or extent[1:] != shape[1:]
            or not extent
            or type(extent[0]) is not int
            or extent[0] < 1
        ):
            raise CheckpointCorruptError(
                f"{where}: shard of {str(shard['file'])[:100]!r} at offset {str(offset)[:100]}, "
                f"extent {str(extent)[:100]} does not continue the shards before it (rows from "
                f"{end}) within shape {shape}"
            )
        if not isinstance(shard["blake3"], str) or not _HEX64.match(shard["blake3"]):
            raise CheckpointCorruptError(f"{where}: a shard's blake3 must be 64 hex digits")
        end += extent[0]
    if shape and end != shape[0]:
        raise CheckpointCorruptError(
            f"{where}: its shards cover rows 0:{end}, its shape {shape} has {shape[0]}"
        )
    if not shape:
        raise CheckpointCorruptError(f"{where}: a 0-d tensor is never sharded")


def _checked_rows(
    manifest: Mapping[str, Any], rows: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """The rows asked for, each of a tensor the checkpoint holds and within its first dimension."""
    index = manifest["tensors"]
    for key, (start, stop) in rows.items():
        shape = index[key]["shape"] if key in index else []
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise CheckpointError(
                f"rows {start}:{stop} of tensor {key[:100]!r} were asked for; the checkpoint holds "
                f"it with shape {shape}"
            )
    return dict(rows)


def _check_memory(total: int, on_disk: int) -> None:
    """Refuse, before any read, a load of `total` bytes that the memory available now cannot hold.

    Available now (`functrain.checkpoint.files.available_memory`): free memory and the page cache
    the kernel can drop, within the process's cgroup limits, not the machine's total. A load that
    would not fit is refused before it allocates, rather than pushing the machine into swap or the
    process into the OOM killer. `on_disk` is what the files' disk blocks hold: far less than
    `total` where they have holes, which the message points out (a crafted checkpoint declares
    data it does not hold).
    """
    memory = available_memory()
    if memory is None or total <= memory:
        return
    holes = (
        f" Its files hold only {on_disk / 2**20:,.1f} MiB on disk (holes where data should be): "
        "unless a file system that compresses wrote them, the checkpoint was crafted or damaged; "
        "remove it to resume from an older one."
        if on_disk < total // 2
        else ""
    )
    raise CheckpointMemoryError(
        f"{MANIFEST}: loading this checkpoint needs {total / 2**20:,.1f} MiB of memory for its "
        f"tensors, and {memory / 2**20:,.1f} MiB are available now: free memory (other "
        "processes, tensors this one holds), or load in a process with a larger memory limit; a "
        "sharded state loads each rank's part alone (functrain.checkpoint.sharded)." + holes
    )


def verify(directory: str | os.PathLike[str], *, digest: str | None = None) -> dict[str, Any]:
    """Check a checkpoint completely (manifest, every file's size, digest, contents); return it.

    A checkpoint that verifies loads: this reads it as `read_tree` does, then drops the tensors.

    Args:
        directory: the checkpoint's path.
        digest: the manifest digest to insist on (see `read_manifest`).

    Raises:
        CheckpointError: no checkpoint there, or one of a newer format version.
        CheckpointCorruptError: naming the first file that does not verify.
    """
    return read_tree(directory, digest=digest)[1]


def is_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True when `directory` holds a complete, verifying checkpoint.

    Raises:
        CheckpointMemoryError: its tensors do not fit in the memory available now, so it cannot
            be verified (which says nothing about whether it would).
        CheckpointPermissionError: this process may not read it (which says nothing either).
    """
    try:
        verify(directory)
    except (CheckpointMemoryError, CheckpointPermissionError):
        raise
    except (CheckpointError, OSError):
        return False
    return True


def read_tree(
    directory: str | os.PathLike[str],
    *,
    map_location: str | torch.device | Callable[[torch.Tensor], torch.Tensor] | None = None,
    named_types: Mapping[str, type] | None = None,
    digest: str | None = None,
    rows: Callable[[Mapping[str, Any]], Mapping[str, tuple[int, int]]] | None = None,
) -> tuple[Tree, dict[str, Any]]:
    """Load a checkpoint's tree and manifest, verifying every file while it is read.

    The tensors of one file are views of the one buffer it was read into (each with a storage of
    its own size, writable); nothing is copied after the read, and nothing ties them to the file.

    Args:
        directory: the checkpoint's path.
        map_location: a device to move tensors to, or a function applied to each tensor.
        named_types: ``"module.QualName" -> class`` to rebuild NamedTuples; others come back as
            dicts.
        digest: the manifest digest to insist on (see `read_manifest`).
        rows: for a sharded load (`functrain.checkpoint.sharded`): given the manifest, the rows
            ``(start, stop)`` along the first dimension that this process needs of some tensors
            (by key). Those come back as these rows only, read from the shards that overlap them,
            each shard verified by its own digest; the other tensors come back whole.

    Returns:
        ``(tree, manifest)``.

    Raises:
        CheckpointError: no checkpoint there, or a newer format.
        CheckpointCorruptError: a file is missing, truncated, altered or malformed (named in the
            message).
        CheckpointVanishedError: the checkpoint was removed or replaced while it was read (a
            writer rotated it away, or saved the same step again): not damage.
    """
    root = Path(directory)
    held = _held_open(root)
    try:
        manifest = read_manifest(root, digest=digest)
        algorithm = _ALGORITHM[manifest["format_version"]]
        wanted = _checked_rows(manifest, rows(manifest) if rows is not None else {})
        tensors = read_all(
            lambda name: _safe_file(root, name), manifest, algorithm, wanted, _check_memory
        )
    except (CheckpointMemoryError, CheckpointPermissionError):
        raise
    except CheckpointError as e:
        # a file missing or not the manifest's: damage, unless the directory itself went
        change = _vanished(root, held)
        if change is None:
            raise
        raise CheckpointVanishedError(
            f"checkpoint {str(root)!r} was {change} while it was read (a writer rotated it "
            "away, or saved the same step again): not damage; read the newest checkpoint again "
            "(CheckpointManager.latest(), or restore_latest(), which does so itself). The read "
            f"failed with: {e}"
        ) from e
    finally:
        if held is not None:
            os.close(held)
    if map_location is not None:
        move = map_location if callable(map_location) else (lambda t: t.to(map_location))
        tensors = {k: move(v) for k, v in tensors.items()}
    reader = _Reader(tensors, named_types)
    tree = reader.node(manifest["structure"], "", 0)
    unused = sorted(set(tensors) - set(reader.used))
    if unused:
        raise CheckpointCorruptError(
            f"{MANIFEST}: tensors {unused[:10]} are stored but not in the structure"
        )
    return tree, manifest


def _held_open(path: Path) -> int | None:
    """A descriptor of directory `path` (the caller closes it), or None where there is none.

    Held while the checkpoint is read: a directory removed meanwhile keeps its inode number until
    closed, so one saved under its name after it (the same step saved again, to which the
    filesystem may give the freed number) is never taken for it (`_vanished`).
    """
    try:  # (O_PATH where there is one: no read permission needed to hold it)
        return os.open(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _vanished(path: Path, held: int | None) -> str | None:
    """How directory `path`, `held` open since a read began, went; None if it did not."""
    if held is None:
        return None  # there was nothing there to go
    st = os.fstat(held)
    try:
        now = os.stat(path)
    except OSError:
        return "removed"
    if st.st_nlink == 0:  # (removed, whatever has its name now)
        return "removed"
    return "replaced" if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) else None


def compare_to_template(
    loaded: Tree, like: Tree, sparse_ok: Callable[[str], bool] = lambda path: False
) -> list[str]:
    """Every difference of a loaded tree from a template: missing/extra paths, shapes, dtypes,
    and a sparse tensor where the template's is dense, unless `sparse_ok` says the path may
    hold one (an optimizer state's sparse momentum, dense zeros until first written)."""
    got, expected = leaves_by_path(loaded), leaves_by_path(like)
    problems = []
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    if extra:
        problems.append(f"in the checkpoint but not in the template: {extra}")
    for path in sorted(set(got) & set(expected)):
        a, b = expected[path], got[path]
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            problems.append(f"{path}: expected {_kind(a)}, got {_kind(b)}")
        elif isinstance(a, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            problems.append(
                f"{path}: expected {list(a.shape)} {a.dtype}, got {list(b.shape)} {b.dtype}"
            )
        elif (
            isinstance(a, torch.Tensor) and b.is_sparse and not a.is_sparse and not sparse_ok(path)
        ):
            problems.append(f"{path}: expected a dense tensor, got a sparse one")
    return problems


def _kind(x: Any) -> str:
    return f"Tensor{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
