"""How a state tree becomes files, and back: safe (no pickle), atomic, self-verifying.

A checkpoint is a directory::

    manifest.json              written last; orjson; describes everything below
    tensors-00000.safetensors  the tree's tensors, keyed by their tree path

The manifest holds the format version, the library versions, the tree's structure with every
non-tensor leaf encoded exactly (NaN, Inf and integers of any size round-trip), a SHA-256 digest
and size per file, a fingerprint of the static parts, and the user's metadata.

A save writes into a temporary directory beside the target, fsyncs each file, writes and fsyncs
the manifest, fsyncs the directory, renames it into place and fsyncs the parent: a process killed
at any instant leaves the previous checkpoint or the new one, complete. Readers ignore temporary
directories (names starting with ``.tmp-``).

Loading never calls pickle or `torch.load`; every size read from a file is bounded before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import safetensors
import safetensors.torch
import torch
import torch.utils._pytree as pytree

from functrain.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "write_tree",
    "read_tree",
    "read_manifest",
    "verify",
    "is_checkpoint",
    "TMP_PREFIX",
    "MANIFEST",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
MAX_FILES = 4096
MAX_TENSORS = 1_000_000
SHARD_BYTES = 2 << 30
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_CHUNK = 16 << 20

Tree = Any


# ---------------------------------------------------------------------------------------------
# encoding the structure


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def _encode_leaf(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {"none": True}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        # as a decimal string: exact at any size, and no JSON reader can round it
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, str):
        return {"str": value}
    raise CheckpointError(
        f"cannot save the leaf at {path!r}: expected a tensor, None, bool, int, float or str, got {type(value).__name__}; "
        "store it as a tensor or in `metadata`"
    )


def _decode_leaf(node: Mapping[str, Any], path: str) -> Any:
    try:
        if "none" in node:
            return None
        if "bool" in node and isinstance(node["bool"], bool):
            return node["bool"]
        if "int" in node and isinstance(node["int"], str) and len(node["int"]) <= 4300:
            return int(node["int"])
        if "float" in node and isinstance(node["float"], str) and len(node["float"]) <= 64:
            return float.fromhex(node["float"])
        if "str" in node and isinstance(node["str"], str):
            return node["str"]
    except ValueError:
        pass
    raise CheckpointCorruptError(f"manifest: malformed leaf at {path!r}: {str(node)[:200]}")


class _Writer:
    """Walks a tree, collecting tensors by path and describing the structure as JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def node(self, tree: Any, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"the tree is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if isinstance(tree, torch.Tensor):
            self.tensors[path] = self._detached(tree)
            return {"tensor": path}
        if isinstance(tree, dict):
            bad = [k for k in tree if not isinstance(k, str)]
            if bad:
                raise CheckpointError(f"dict keys must be str to be saved, got {bad[:5]} at {path!r}")
            return {"dict": {k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in tree.items()}}
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            cls = type(tree)
            fields = {f: self.node(getattr(tree, f), _join(path, f), depth + 1) for f in tree._fields}
            return {"namedtuple": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
        if isinstance(tree, (tuple, list)):
            kind = "tuple" if isinstance(tree, tuple) else "list"
            return {kind: [self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(tree)]}
        return {"leaf": _encode_leaf(tree, path)}

    def _detached(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # safetensors refuses tensors that share memory; a counter reused across fields is one
        shared = key in self._storages and t.numel() > 0
        self._storages.add(key)
        if shared or not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        return t


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


class _Reader:
    def __init__(self, tensors: Mapping[str, torch.Tensor], named_types: Mapping[str, type] | None) -> None:
        self.tensors = tensors
        self.named_types = named_types or {}
        self.used: set[str] = set()

    def node(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CheckpointCorruptError(f"manifest: structure nested deeper than {MAX_DEPTH} levels at {path!r}")
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise CheckpointCorruptError(f"manifest: malformed structure node at {path!r}")
        if "tensor" in node:
            key = node["tensor"]
            if key not in self.tensors:
                raise CheckpointCorruptError(f"manifest: tensor {key!r} at {path!r} is in no tensor file")
            self.used.add(key)
            return self.tensors[key]
        if "dict" in node and isinstance(node["dict"], dict):
            return {k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in node["dict"].items()}
        if "namedtuple" in node and isinstance(node.get("fields"), dict):
            fields = {k: self.node(v, _join(path, k), depth + 1) for k, v in node["fields"].items()}
            cls = self.named_types.get(node["namedtuple"])
            return cls(**fields) if cls is not None else fields
        for kind, make in (("tuple", tuple), ("list", list)):
            if kind in node and isinstance(node[kind], list):
                return make(self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(node[kind]))
        if "leaf" in node and isinstance(node["leaf"], dict):
            return _decode_leaf(node["leaf"], path)
        raise CheckpointCorruptError(f"manifest: unknown structure node at {path!r}: {str(node)[:200]}")


# ---------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes | memoryview) -> str:
    """Write, fsync and return the SHA-256 hex digest of `data`."""
    digest = hashlib.sha256(data).hexdigest()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_CHUNK])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _shards(tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_tree(
    directory: str | os.PathLike[str],
    tree: Tree,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    library_version: str = "",
) -> Path:
    """Write `tree` as a checkpoint directory at `directory`, atomically.

    Args:
        directory: the checkpoint's path. An existing checkpoint there is replaced only once the
            new one is complete.
        tree: nested dicts (str keys), lists, tuples and NamedTuples of tensors and of None, bool,
            int, float or str.
        fingerprint: JSON-able description of the static parts, compared when loading.
        metadata: JSON-able user data (floats NaN/Inf are refused here; keep those in the tree).
        library_version: recorded in the manifest.

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
    writer = _Writer()
    structure = writer.node(tree, "", 0)
    try:
        extra = orjson.dumps({"fingerprint": fingerprint or {}, "metadata": metadata or {}})
    except TypeError as e:
        raise CheckpointError(f"fingerprint and metadata must be JSON-able (str keys; str, numbers, bool, None, lists, dicts): {e}") from e
    extras = json.loads(extra)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        index: dict[str, dict[str, Any]] = {}
        for i, shard in enumerate(_shards(writer.tensors)):
            name = f"tensors-{i:05d}.safetensors"
            data = safetensors.torch.save(shard)
            files[name] = {"sha256": _write_file(tmp / name, data), "bytes": len(data)}
            for key, t in shard.items():
                index[key] = {"file": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        manifest = {
            "format": "functrain.checkpoint",
            "format_version": FORMAT_VERSION,
            "functrain_version": library_version,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
            "structure": structure,
            "tensors": index,
            "files": files,
            "fingerprint": extras["fingerprint"],
            "metadata": extras["metadata"],
        }
        _write_file(tmp / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        _fsync_dir(tmp)
        _commit(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {str(target)!r}: {e}; the previous checkpoint there (if any) is intact") from e
        raise
    return target


def _commit(tmp: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        # two renames: a crash between them leaves the old copy complete under `.tmp-old-`,
        # and no half-written directory at `target`
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------
# reading


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointCorruptError(f"manifest: duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise CheckpointCorruptError(f"manifest: non-standard JSON constant {name}")


def _safe_file(directory: Path, name: Any) -> Path:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise CheckpointCorruptError(f"manifest: refused file name {str(name)[:100]!r} (expected ^[A-Za-z0-9._-]+$, no '..')")
    path = directory / name
    if path.is_symlink():
        raise CheckpointCorruptError(f"{name}: is a symbolic link; checkpoint files must be regular files in the directory")
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's manifest (no tensor is loaded).

    Raises:
        CheckpointError: no checkpoint at `directory`.
        CheckpointCorruptError: the manifest is too large, malformed, or of a newer format.
    """
    root = Path(directory)
    path = root / MANIFEST
    if not root.is_dir() or not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(root)!r}: expected a directory with {MANIFEST}")
    if path.is_symlink():
        raise CheckpointCorruptError(f"{MANIFEST}: is a symbolic link")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise CheckpointCorruptError(f"{MANIFEST}: {size} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointCorruptError):
            raise
        raise CheckpointCorruptError(f"{MANIFEST}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    _check_manifest(manifest)
    return manifest


def _check_manifest(m: Any) -> None:
    if not isinstance(m, dict) or m.get("format") != "functrain.checkpoint":
        raise CheckpointCorruptError(f"{MANIFEST}: not a functrain checkpoint manifest")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointCorruptError(f"{MANIFEST}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this functrain reads (up to {FORMAT_VERSION}); "
            f"it was written by functrain {m.get('functrain_version')!r}: upgrade functrain to load it"
        )
    for key, kind in (("structure", dict), ("tensors", dict), ("files", dict), ("fingerprint", dict), ("metadata", dict)):
        if not isinstance(m.get(key), kind):
            raise CheckpointCorruptError(f"{MANIFEST}: field {key!r} missing or not a {kind.__name__}")
    if len(m["files"]) > MAX_FILES or len(m["tensors"]) > MAX_TENSORS:
        raise CheckpointCorruptError(f"{MANIFEST}: too many files or tensors")
    for name, info in m["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not isinstance(info.get("bytes"), int):
            raise CheckpointCorruptError(f"{MANIFEST}: malformed entry for file {str(name)[:100]!r}")


def _read_verified(path: Path, info: Mapping[str, Any]) -> bytes:
    name = path.name
    expected = info["bytes"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{name}: missing from the checkpoint") from None
    if size != expected:
        raise CheckpointCorruptError(f"{name}: {size} bytes, the manifest records {expected} (truncated or replaced)")
    with open(path, "rb") as f:
        data = f.read(expected + 1)
    if len(data) != expected or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise CheckpointCorruptError(f"{name}: SHA-256 digest does not match the manifest (the file is corrupt)")
    return data


def verify(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint's manifest and every file's size and digest; return the manifest.

    Raises:
        CheckpointError: no checkpoint there.
        CheckpointCorruptError: naming the first file that does not verify.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    for name, info in manifest["files"].items():
        _read_verified(_safe_file(root, name), info)
    return manifest


def is_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True when `directory` holds a complete, verifying checkpoint."""
    try:
        verify(directory)
    except (CheckpointError, OSError):
        return False
    return True


def read_tree(
    directory: str | os.PathLike[str],
    *,
    map_location: str | torch.device | Callable[[torch.Tensor], torch.Tensor] | None = None,
    named_types: Mapping[str, type] | None = None,
) -> tuple[Tree, dict[str, Any]]:
    """Load a checkpoint's tree and manifest, verifying every file first.

    Args:
        directory: the checkpoint's path.
        map_location: a device to move tensors to, or a function applied to each tensor.
        named_types: ``"module.QualName" -> class`` to rebuild NamedTuples; others come back as dicts.

    Returns:
        ``(tree, manifest)``.

    Raises:
        CheckpointError: no checkpoint there, or a newer format.
        CheckpointCorruptError: a file is missing, truncated, altered or malformed.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in manifest["files"].items():
        data = _read_verified(_safe_file(root, name), info)
        try:
            loaded = safetensors.torch.load(data)
        except (safetensors.SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
            raise CheckpointCorruptError(f"{name}: not a valid safetensors file ({str(e)[:200]})") from None
        tensors.update(loaded)
    _check_index(manifest["tensors"], tensors)
    if map_location is not None:
        move = map_location if callable(map_location) else (lambda t: t.to(map_location))
        tensors = {k: move(v) for k, v in tensors.items()}
    reader = _Reader(tensors, named_types)
    tree = reader.node(manifest["structure"], "", 0)
    unused = sorted(set(tensors) - reader.used)
    if unused:
        raise CheckpointCorruptError(f"manifest: tensors {unused[:10]} are stored but not in the structure")
    return tree, manifest


def _check_index(index: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(index) - set(tensors))
    if missing:
        raise CheckpointCorruptError(f"manifest lists tensors not found in any file: {missing[:10]}")
    for key, info in index.items():
        t = tensors[key]
        if not isinstance(info, dict) or info.get("shape") != list(t.shape) or info.get("dtype") != str(t.dtype).removeprefix("torch."):
            raise CheckpointCorruptError(f"tensor {key!r}: the manifest records {info}, the file holds {list(t.shape)} {t.dtype}")


def leaves_by_path(tree: Tree) -> dict[str, Any]:
    """The leaves of `tree` keyed by the same paths a checkpoint uses."""
    flat, _ = pytree.tree_flatten_with_path(tree)
    return {"/".join(_escape(str(_key(k))) for k in path): leaf for path, leaf in flat}


def _key(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def compare_to_template(loaded: Tree, like: Tree) -> list[str]:
    """Every difference between a loaded tree and a template: missing/extra paths, shapes, dtypes."""
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
            problems.append(f"{path}: expected {list(a.shape)} {a.dtype}, got {list(b.shape)} {b.dtype}")
    return problems


def _kind(x: Any) -> str:
    return f"Tensor{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


