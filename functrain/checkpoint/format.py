"""How a state tree becomes files, and back: safe (no pickle), atomic, self-verifying.

A checkpoint is a directory::

    manifest.json              written last; describes everything below, and seals itself
    tensors-00000.safetensors  the tree's tensors, keyed by their tree path

The manifest holds the format version, the library versions, the tree's structure with every
non-tensor leaf encoded exactly (NaN, Inf and integers of any size round-trip), a SHA-256 digest
and size per file, a fingerprint of the static parts, and the user's metadata. Its first field,
``manifest_sha256``, is the SHA-256 of the manifest's own bytes with that field's 64 hex digits
written as zeros (format version 2; version 1 manifests have no such field and still load).

A save writes into a temporary directory beside the target, fsyncs each file, writes and fsyncs
the manifest, fsyncs the directory, swaps it into place (one atomic ``renameat2`` exchange where
the OS has it) and fsyncs the parent: a process killed at any instant leaves the previous
checkpoint or the new one, complete. Readers ignore temporary directories (names starting with
``.tmp-``).

Loading never calls pickle or `torch.load`; every size read from a file is bounded before use.
Tensor files are written straight from the tensors' memory and read into one buffer per file that
the loaded tensors are views of, each file hashed in a second thread while it is written or read.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import torch

from functrain.errors import CheckpointCorruptError, CheckpointError
from functrain.checkpoint.tensorfile import (
    _CHUNK,
    _CODE_OF,
    _finite_float,
    _no_constants,
    _parse_safetensors,
    _safetensors_chunks,
    _unique_keys,
)
from functrain.tree import escape_key as _escape
from functrain.tree import leaves_by_path

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

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
MAX_FILES = 4096
MAX_TENSORS = 1_000_000
SHARD_BYTES = 2 << 30
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_SEAL = b'{\n  "manifest_sha256": "'
_OVERLAP_BYTES = 4 << 20  # below this, hashing in a second thread costs more than it saves


Tree = Any


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
            raise CheckpointError(f"cannot save the int at {path!r}: it has over 4300 digits; store it as a str") from None
    if isinstance(value, float):
        # float.hex() spells every NaN "nan"; the sign at least can be kept
        negative_nan = math.isnan(value) and math.copysign(1.0, value) < 0
        return {"float": "-nan" if negative_nan else float.hex(value)}
    if isinstance(value, str):
        _check_utf8(value, path)
        return {"str": value}
    raise CheckpointError(
        f"cannot save the leaf at {path!r}: expected a tensor, None, bool, int, float or str, got {type(value).__name__}; "
        "store it as a tensor or in `metadata`"
    )


def _check_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"cannot save {text[:50]!r} at {path!r}: not valid UTF-8 (a lone surrogate)") from None


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
    except ValueError:
        pass
    raise CheckpointCorruptError(f"{MANIFEST}: malformed leaf at {path!r}: {str(node)[:200]}")


class _Writer:
    """Walks a tree, collecting tensors by path and describing the structure as JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def node(self, tree: Any, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise CheckpointError(f"the tree is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if isinstance(tree, torch.Tensor):
            self.tensors[path] = self._detached(tree, path)
            return {"tensor": path}
        if isinstance(tree, dict):
            bad = [k for k in tree if not isinstance(k, str)]
            if bad:
                raise CheckpointError(f"dict keys must be str to be saved, got {bad[:5]} at {path!r}")
            for k in tree:
                _check_utf8(k, path)
            return {"dict": {k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in tree.items()}}
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            cls = type(tree)
            fields = {f: self.node(getattr(tree, f), _join(path, f), depth + 1) for f in tree._fields}
            return {"namedtuple": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
        if isinstance(tree, (tuple, list)):
            kind = "tuple" if isinstance(tree, tuple) else "list"
            return {kind: [self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(tree)]}
        return {"leaf": _encode_leaf(tree, path)}

    def _detached(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if t.dtype not in _CODE_OF or t.layout != torch.strided or t.device.type == "meta":
            raise CheckpointError(
                f"cannot save the tensor at {path!r}: {t.dtype} {t.layout} on {t.device}; "
                f"dense tensors on a real device of these dtypes can be saved: {sorted(str(d) for d in _CODE_OF)}"
            )
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # tensors that share memory are written once each; a counter reused across fields is one
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
            raise CheckpointCorruptError(f"{MANIFEST}: structure nested deeper than {MAX_DEPTH} levels at {path!r}")
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise CheckpointCorruptError(f"{MANIFEST}: malformed structure node at {path!r}")
        if "tensor" in node:
            key = node["tensor"]
            if not isinstance(key, str) or key not in self.tensors:
                raise CheckpointCorruptError(f"{MANIFEST}: tensor {str(key)[:100]!r} at {path!r} is in no tensor file")
            self.used.add(key)
            return self.tensors[key]
        if "dict" in node and isinstance(node["dict"], dict):
            return {k: self.node(v, _join(path, _escape(k)), depth + 1) for k, v in node["dict"].items()}
        if "namedtuple" in node and isinstance(node["namedtuple"], str) and isinstance(node.get("fields"), dict):
            fields = {k: self.node(v, _join(path, k), depth + 1) for k, v in node["fields"].items()}
            cls = self.named_types.get(node["namedtuple"])
            try:
                return cls(**fields) if cls is not None else fields
            except TypeError as e:
                raise CheckpointCorruptError(f"{MANIFEST}: the fields at {path!r} do not fit {node['namedtuple']}: {e}") from None
        for kind, make in (("tuple", tuple), ("list", list)):
            if kind in node and isinstance(node[kind], list):
                return make(self.node(v, _join(path, str(i)), depth + 1) for i, v in enumerate(node[kind]))
        if "leaf" in node and isinstance(node["leaf"], dict):
            return _decode_leaf(node["leaf"], path)
        raise CheckpointCorruptError(f"{MANIFEST}: unknown structure node at {path!r}: {str(node)[:200]}")


# ---------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes | memoryview | Iterable[memoryview]) -> str:
    """Write `data` (bytes, or buffers in order), fsync, and return the SHA-256 hex digest.

    Each buffer is hashed in a second thread while it is written (both release the GIL).
    """
    chunks = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if sum(len(c) for c in chunks) < _OVERLAP_BYTES:
            for chunk in chunks:
                digest.update(chunk)
                _write_all(fd, chunk)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="functrain-sha256") as pool:
                for chunk in chunks:
                    hashing = pool.submit(digest.update, chunk)
                    _write_all(fd, chunk)
                    hashing.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _write_all(fd: int, view: memoryview) -> None:
    view = view.cast("B")
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


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


def _sealed(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's bytes, its first field the SHA-256 of those bytes with that field zeroed."""
    raw = orjson.dumps({"manifest_sha256": "0" * 64, **manifest}, option=orjson.OPT_INDENT_2)
    assert raw.startswith(_SEAL)
    return raw[: len(_SEAL)] + hashlib.sha256(raw).hexdigest().encode() + raw[len(_SEAL) + 64 :]


def _json_extras(fingerprint: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    extras = {"fingerprint": fingerprint or {}, "metadata": metadata or {}}
    try:
        encoded = orjson.dumps(extras)
        _refuse_nonfinite(extras, "")  # orjson would write them as null
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"fingerprint and metadata must be JSON-able (str keys; str, finite numbers, bool, None, lists, dicts): {e}") from e
    return json.loads(encoded)


def _refuse_nonfinite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}; keep non-finite numbers in the tree, or as str")
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        _refuse_nonfinite(v, f"{path}/{k}" if path else str(k))


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
    extras = _json_extras(fingerprint, metadata)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        index: dict[str, dict[str, Any]] = {}
        for i, shard in enumerate(_shards(writer.tensors)):
            name = f"tensors-{i:05d}.safetensors"
            chunks = _safetensors_chunks(shard)
            files[name] = {"sha256": _write_file(tmp / name, chunks), "bytes": sum(len(c) for c in chunks)}
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
        _write_file(tmp / MANIFEST, _sealed(manifest))
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {str(target)!r}: {e}; the previous checkpoint there (if any) is intact") from e
        raise
    try:
        _commit(tmp, target)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {str(target)!r}: {e}; the previous checkpoint there (if any) is intact") from e
    return target


def _commit(tmp: Path, target: Path) -> None:
    """Put the complete checkpoint `tmp` at `target`; on any failure leave `target` as it was."""
    try:
        if target.exists() or target.is_symlink():
            displaced: Path | None = _replace(tmp, target)
        else:
            os.rename(tmp, target)
            displaced = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _fsync_dir(target.parent)
    except BaseException:
        # the caller is told the save failed, so `target` must hold what it held before
        if displaced is None:
            os.rename(target, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(_replace(displaced, target), ignore_errors=True)
        raise
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def _replace(new: Path, target: Path) -> Path:
    """Move directory `new` to `target`, atomically where the OS can; return where the old `target` went."""
    try:
        _exchange(new, target)
        return new
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # two renames: a crash between them leaves no checkpoint at `target`, the old one complete
    # under `.tmp-old-`; a failure of the second puts the old one back
    old = target.parent / f"{TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ENOSYS elsewhere."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError, TypeError):
            _renameat2 = False
    if _renameat2 is False:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


# ---------------------------------------------------------------------------------------------
# reading


def _safe_file(directory: Path, name: Any) -> Path:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise CheckpointCorruptError(f"{MANIFEST}: refused file name {str(name)[:100]!r} (expected ^[A-Za-z0-9._-]{{1,200}}$, no '..')")
    return directory / name


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint's manifest (no tensor is loaded).

    Raises:
        CheckpointError: no checkpoint at `directory`, or one of a newer format version.
        CheckpointCorruptError: the manifest is too large, malformed, or does not match its own digest.
    """
    root = Path(directory)
    path = root / MANIFEST
    try:
        if not root.is_dir() or not path.is_file():
            raise CheckpointError(f"no checkpoint at {str(root)!r}: expected a directory with {MANIFEST}")
        if path.is_symlink():
            raise CheckpointCorruptError(f"{MANIFEST}: is a symbolic link; checkpoint files must be regular files in the directory")
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(f"{MANIFEST}: {size} bytes, over the limit of {MAX_MANIFEST_BYTES}")
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"could not read {str(path)!r}: {e}") from None
    sealed = _check_seal(raw)
    try:
        hooks = {"object_pairs_hook": _unique_keys(MANIFEST), "parse_constant": _no_constants(MANIFEST), "parse_float": _finite_float(MANIFEST)}
        manifest = json.loads(raw, **hooks)
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointCorruptError):
            raise
        raise CheckpointCorruptError(f"{MANIFEST}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    _check_manifest(manifest, sealed)
    return manifest


def _check_seal(raw: bytes) -> bool:
    """Whether the manifest seals itself; raise if its seal does not match its bytes."""
    if not raw.startswith(_SEAL):
        return False
    start, end = len(_SEAL), len(_SEAL) + 64
    zeroed = raw[:start] + b"0" * 64 + raw[end:]
    if hashlib.sha256(zeroed).hexdigest().encode() != raw[start:end]:
        raise CheckpointCorruptError(f"{MANIFEST}: its SHA-256 does not match the manifest_sha256 it records (the file is corrupt)")
    return True


def _check_manifest(m: Any, sealed: bool) -> None:
    if not isinstance(m, dict) or m.get("format") != "functrain.checkpoint":
        raise CheckpointCorruptError(f"{MANIFEST}: not a functrain checkpoint manifest")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointCorruptError(f"{MANIFEST}: invalid format_version {str(version)[:50]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this functrain reads (up to {FORMAT_VERSION}); "
            f"it was written by functrain {m.get('functrain_version')!r}: upgrade functrain to load it"
        )
    if version >= 2 and not sealed:
        raise CheckpointCorruptError(f"{MANIFEST}: format version {version} starts with its own digest, manifest_sha256; it is missing or damaged")
    for key, kind in (("structure", dict), ("tensors", dict), ("files", dict), ("fingerprint", dict), ("metadata", dict)):
        if not isinstance(m.get(key), kind):
            raise CheckpointCorruptError(f"{MANIFEST}: field {key!r} missing or not a {kind.__name__}")
    if len(m["files"]) > MAX_FILES or len(m["tensors"]) > MAX_TENSORS:
        raise CheckpointCorruptError(f"{MANIFEST}: too many files or tensors")
    for name, info in m["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or type(info.get("bytes")) is not int:
            raise CheckpointCorruptError(f"{MANIFEST}: malformed entry for file {str(name)[:100]!r}")


def _read_verified(path: Path, info: Mapping[str, Any]) -> torch.Tensor:
    """The file's bytes, in a uint8 tensor, after checking its size and SHA-256 against `info`."""
    name = path.name
    expected = info["bytes"]
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{name}: missing from the checkpoint") from None
    except OSError as e:
        raise CheckpointCorruptError(f"{name}: cannot be read ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise CheckpointCorruptError(f"{name}: is {kind}; checkpoint files must be regular files in the directory")
    if st.st_size != expected:
        raise CheckpointCorruptError(f"{name}: {st.st_size} bytes, the manifest records {expected} (truncated or replaced)")
    data = torch.empty(expected, dtype=torch.uint8)  # not zeroed first, unlike a bytearray
    try:
        digest = _read_hashing(path, memoryview(data.numpy()))
    except OSError as e:
        raise CheckpointCorruptError(f"{name}: cannot be read ({e})") from None
    if digest is None:
        raise CheckpointCorruptError(f"{name}: changed size while it was read")
    if digest != info["sha256"]:
        raise CheckpointCorruptError(f"{name}: SHA-256 digest does not match the manifest (the file is corrupt)")
    return data


def _read_hashing(path: Path, out: memoryview) -> str | None:
    """Fill `out` from `path`, hashing each chunk in a second thread while the next one is read.

    Returns the SHA-256 hex digest, or None when the file does not hold exactly ``len(out)`` bytes.
    """
    digest = hashlib.sha256()
    pool = ThreadPoolExecutor(1, thread_name_prefix="functrain-sha256") if len(out) >= _OVERLAP_BYTES else None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        pos, hashing = 0, None
        while pos < len(out):
            n = os.readv(fd, [out[pos : pos + _CHUNK]])
            if not n:
                return None
            if hashing is not None:
                hashing.result()
            if pool is None:
                digest.update(out[pos : pos + n])
            else:
                hashing = pool.submit(digest.update, out[pos : pos + n])
            pos += n
        if hashing is not None:
            hashing.result()
        if os.read(fd, 1):
            return None
    finally:
        os.close(fd)
        if pool is not None:
            pool.shutdown()
    return digest.hexdigest()


def verify(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint completely (manifest, every file's size, digest and contents); return the manifest.

    A checkpoint that verifies loads: this reads it as `read_tree` does, then drops the tensors.

    Raises:
        CheckpointError: no checkpoint there, or one of a newer format version.
        CheckpointCorruptError: naming the first file that does not verify.
    """
    return read_tree(directory)[1]


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

    The tensors of one file are views of the one buffer it was read into (each with a storage of
    its own size, writable); nothing is copied after the read.

    Args:
        directory: the checkpoint's path.
        map_location: a device to move tensors to, or a function applied to each tensor.
        named_types: ``"module.QualName" -> class`` to rebuild NamedTuples; others come back as dicts.

    Returns:
        ``(tree, manifest)``.

    Raises:
        CheckpointError: no checkpoint there, or a newer format.
        CheckpointCorruptError: a file is missing, truncated, altered or malformed (named in the message).
    """
    root = Path(directory)
    manifest = read_manifest(root)
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name, info in manifest["files"].items():
        data = _read_verified(_safe_file(root, name), info)
        for key, t in _parse_safetensors(name, data).items():
            if key in tensors:
                raise CheckpointCorruptError(f"{name}: tensor {key[:100]!r} is also stored in {source[key]}")
            tensors[key], source[key] = t, name
    _check_index(manifest["tensors"], tensors, source)
    if map_location is not None:
        move = map_location if callable(map_location) else (lambda t: t.to(map_location))
        tensors = {k: move(v) for k, v in tensors.items()}
    reader = _Reader(tensors, named_types)
    tree = reader.node(manifest["structure"], "", 0)
    unused = sorted(set(tensors) - reader.used)
    if unused:
        raise CheckpointCorruptError(f"{MANIFEST}: tensors {unused[:10]} are stored but not in the structure")
    return tree, manifest


def _check_index(index: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: Mapping[str, str]) -> None:
    for key, info in index.items():
        where = info.get("file") if isinstance(info, dict) and isinstance(info.get("file"), str) else MANIFEST
        if key not in tensors:
            raise CheckpointCorruptError(f"{where[:100]}: does not hold tensor {key[:100]!r}, which the manifest lists")
        t = tensors[key]
        if not isinstance(info, dict) or info.get("shape") != list(t.shape) or info.get("dtype") != str(t.dtype).removeprefix("torch."):
            raise CheckpointCorruptError(f"{source[key]}: tensor {key[:100]!r} is {list(t.shape)} {t.dtype}, the manifest records {str(info)[:200]}")
    extra = sorted(set(tensors) - set(index))
    if extra:
        raise CheckpointCorruptError(f"{source[extra[0]]}: holds tensors the manifest does not list: {extra[:10]}")


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
