"""Checkpoints of sharded states: every rank writes its own shards, one manifest seals them all.

A sharded state's sharded leaves are `DTensor`s placed ``(Shard(0),)`` on a 1-D mesh (torch's
uneven chunking: a rank may hold no rows); every other leaf is replicated. A save is collective:
every rank of the process group calls it with its own state, and

1. rank 0 creates the temporary directory and tells the others its name;
2. every rank writes its shards, in parallel, into ``shards-<rank>-NNNNN.safetensors`` files
   there (rank 0 also writes the replicated leaves, once, into ``tensors-NNNNN.safetensors``),
   each file fsynced and digested as a plain save's;
3. the ranks exchange what they wrote (file digests and sizes, each shard's offset, extent and
   digest) as orjson bytes in tensors: no pickle anywhere;
4. rank 0 writes the manifest (format 4: each sharded tensor's global shape and dtype and its
   shards in order) and commits the directory with the single atomic rename of a plain save.

Any rank's failure in 1 to 3 is known to every rank at the next exchange: all of them raise, rank
0 removes the temporary directory, and the previous checkpoint is untouched. A rank killed at any
instant leaves no manifest: nothing looks complete (the next writer removes the ``.tmp-`` entry),
and the other ranks' collectives fail rather than wait (gloo reports a lost peer). The exchanges
run on a gloo group of their own (`exchange_group`, or the `CheckpointManager`'s), never on the
training's: an async save exchanges from its background thread while training goes on.

A load reshards: a checkpoint holds global tensors, so it loads into a template of any world size
and sharding mode, or into plain tensors in one process. Each rank reads only the shards that
overlap its rows, each verified by its own digest; a plain checkpoint's file is read whole and
sliced. Loading into a sharded template is collective too: the ranks agree on the outcome, so a
missing, truncated or swapped shard that one rank reads is a `CheckpointCorruptError` on every rank.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from functrain import errors
from functrain.checkpoint.commit import not_written, temporary
from functrain.checkpoint.files import digest_of_range, open_regular, wait_for_removals
from functrain.checkpoint.format import (
    SHARDED_FORMAT_VERSION,
    TreeWriter,
    build_manifest,
    committed,
    json_extras,
    read_tree,
    tensor_file_digests,
    write_manifest,
    write_tensor_files,
)
from functrain.checkpoint.reading import index_by_file, read_header
from functrain.distributed.data_parallel import all_gather_json
from functrain.distributed.sharding import is_sharded
from functrain.distributed.sharding import like as placed_as
from functrain.errors import CheckpointError
from functrain.tree import Tree, leaves_by_path

__all__ = [
    "is_sharded",
    "has_dtensors",
    "chunk_rows",
    "exchange_group",
    "agree",
    "agreed",
    "write_sharded",
    "written_digests",
    "rows_wanted",
    "place",
    "placed_like",
    "read_for",
]


# ---------------------------------------------------------------------------------------------
# sharded leaves


def has_dtensors(tree: Tree) -> bool:
    """Whether any leaf of `tree` is a `DTensor`: saving and loading it are collective."""
    return any(is_sharded(leaf) for leaf in leaves_by_path(tree).values())


def chunk_rows(n: int, world: int, index: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of `n` (maybe none) that `torch.chunk` gives part `index`.

    Example:
        >>> [chunk_rows(5, 4, i) for i in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    size = -(-n // world)
    start = min(index * size, n)
    return start, min(start + size, n)


def _layout(t: Any, path: str) -> tuple[int, int] | None:
    """The rows ``(start, stop)`` of a DTensor this rank holds; None when it is replicated."""
    from torch.distributed.tensor import Replicate, Shard

    placements, mesh = tuple(t.placements), t.device_mesh
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if (
        mesh.ndim != 1
        or len(placements) != 1
        or not isinstance(placements[0], Shard)
        or placements[0].dim != 0
        or t.dim() == 0
    ):
        raise CheckpointError(
            f"cannot save or load the DTensor at {path!r}: placements {placements} on a "
            f"{mesh.ndim}-D mesh; sharded checkpoints hold tensors placed (Shard(0),) or "
            "replicated on a 1-D mesh"
        )
    start, stop = chunk_rows(t.shape[0], mesh.size(), mesh.get_local_rank())
    if t._local_tensor.shape[0] != stop - start:
        raise CheckpointError(
            f"the DTensor at {path!r} holds {t._local_tensor.shape[0]} rows on this rank, expected "
            f"rows {start}:{stop} of {t.shape[0]} (torch.chunk's split along dim 0): build it with "
            "distribute_tensor or DTensor.from_local of torch.chunk's pieces"
        )
    return start, stop


class _ShardWriter(TreeWriter):
    """A rank's walk of the tree: its shards by path, with their rows.

    On rank 0 it also collects the replicated leaves.
    """

    def __init__(self, replicated: bool) -> None:
        super().__init__()
        self.replicated = replicated
        self.shards: dict[str, tuple[torch.Tensor, int]] = {}
        self.sharded: dict[str, dict[str, Any]] = {}

    def node(self, tree: Any, path: str, depth: int) -> dict[str, Any]:
        if is_sharded(tree):
            rows = _layout(tree, path)
            local = tree._local_tensor
            if rows is None:
                return super().node(local, path, depth)
            self.sharded[path] = {
                "dtype": str(tree.dtype).removeprefix("torch."),
                "shape": list(tree.shape),
            }
            if rows[1] > rows[0]:
                self.shards[path] = (self._detached(local, path), rows[0])
            return {"tensor": path}
        if isinstance(tree, torch.Tensor) and not self.replicated:
            self._detached(
                tree[:0] if tree.dim() else tree.reshape(1)[:0], path
            )  # the dtype checks only: rank 0 writes it
            return {"tensor": path}
        return super().node(tree, path, depth)


# ---------------------------------------------------------------------------------------------
# exchanges: orjson bytes in CPU tensors, on a gloo group


_groups: dict[Any, Any] = {}


def exchange_group() -> Any:
    """The gloo group over every rank on which checkpoints exchange their metadata, made once.

    Made the first time a collective save or load needs it, by every rank at that call (so from
    the thread that runs the training, as all group creations must be).
    """
    key = dist.group.WORLD
    if key not in _groups:
        _groups.clear()  # a destroyed default group's exchanges go with it
        _groups[key] = dist.new_group(backend="gloo")
    return _groups[key]


_ERRORS = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.FunctrainError)
}


def _described(error: BaseException | None) -> dict[str, str] | None:
    if error is None:
        return None
    kind = type(error).__name__ if type(error).__name__ in _ERRORS else "CheckpointError"
    return {
        "kind": kind,
        "message": f"{type(error).__name__}: {error}"
        if kind == "CheckpointError" and not isinstance(error, CheckpointError)
        else str(error),
    }


def agree(error: BaseException | None, group: Any, what: str) -> list[Any]:
    """Tell every rank whether any failed; raise the first failure on every rank alike.

    Returns the ranks' reports (None each) when none failed. The error raised is of the first
    failing rank's class (a `FunctrainError`; anything else becomes a `CheckpointError`), its
    message naming that rank, chained to this rank's own error where it has one.
    """
    return _agree_reports({"error": _described(error)}, error, group, what)


def agreed(work: Callable[[], Any], group: Any, what: str, run: bool = True) -> Any:
    """`work()` on this rank (where `run`), then `agree` on its outcome over `group`: every rank
    raises the first failure alike, or none does. Its result (None where not run).

    Without a `group` (a plain save or load), `work()` alone.
    """
    if group is None:
        return work()
    result, error = None, None
    if run:
        try:
            result = work()
        except Exception as e:
            error = e
    agree(error, group, what)
    return result


def _agree_reports(
    report: dict[str, Any], error: BaseException | None, group: Any, what: str
) -> list[dict[str, Any]]:
    reports = all_gather_json(report, group)
    failed = [(rank, r["error"]) for rank, r in enumerate(reports) if r["error"] is not None]
    if not failed:
        return reports
    rank, first = failed[0]
    others = f" (and on ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
    raise _ERRORS.get(first["kind"], CheckpointError)(
        f"{what} failed on rank {rank}{others}: {first['message']}"
    ) from error


# ---------------------------------------------------------------------------------------------
# saving


def write_sharded(
    directory: str | os.PathLike[str],
    tree: Tree,
    *,
    group: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    library_version: str = "",
    before_commit: Callable[[], None] | None = None,
    check_file: Callable[[str, str], None] | None = None,
    make_parent: bool = True,
) -> Path:
    """Write a tree of sharded and replicated tensors as one checkpoint, every rank its own shards.

    Collective: every rank of `group` calls it with its part of the same tree. See the module's
    docstring for the protocol and what a failure or a killed rank leaves.

    Args:
        directory: the checkpoint's path (the same on every rank; a file system they share).
        tree: as for `write_tree`, with `DTensor` leaves placed ``(Shard(0),)`` or replicated.
        group: a gloo group over the ranks for the exchanges; by default `exchange_group()`.
        fingerprint, metadata, library_version: as for `write_tree` (rank 0's are recorded).
        before_commit: called on every rank once its files are durable; what it raises on any
            rank aborts the save on all of them.
        check_file: as for `write_tree`, for this rank's files (an async save compares them with
            the `part_digests` it took earlier); what it raises aborts the save on every rank.
        make_parent: as for `write_tree` (rank 0 makes it).

    Returns:
        The checkpoint's path, on every rank, once rank 0 has committed it.

    Raises:
        CheckpointError (or the class of the first failing rank's error): on every rank, when any
            rank's part failed; the previous checkpoint at `directory` is intact.
    """
    group = exchange_group() if group is None else group
    rank = dist.get_rank(group)
    target = Path(directory)
    wait_for_removals()
    writer, extras, tmp, error = _ShardWriter(replicated=rank == 0), None, None, None
    try:
        structure = writer.node(tree, "", 0)
        extras = json_extras(fingerprint, metadata)
        if rank == 0:
            tmp = temporary(target, make_parent)
    except Exception as e:
        error = e
    what = f"saving checkpoint {str(target)!r}"
    try:
        reports = _agree_reports(
            {
                "error": _described(error),
                "tmp": tmp.name if tmp is not None else None,
                "path": str(target.absolute()),
            },
            error,
            group,
            what,
        )
        paths = sorted({report["path"] for report in reports})
        if len(paths) > 1:
            raise CheckpointError(
                f"{what}: the ranks save a sharded state together, to one path on a file system "
                f"they share; they passed {paths[:4]}"
            )
        tmp = target.parent / reports[0]["tmp"]
        reports = _agree_reports(
            _write_part(tmp, target, writer, rank, before_commit, check_file), None, group, what
        )
    except BaseException:
        if tmp is not None and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def commit_manifest() -> None:
        with committed(tmp, target):
            write_manifest(tmp, _manifest(structure, writer, reports, extras, library_version))

    agreed(commit_manifest, group, f"committing checkpoint {str(target)!r}", run=rank == 0)
    return target


def part_digests(tree: Tree, group: Any = None) -> dict[str, str]:
    """The digest of each file `write_sharded` would write for this rank's part of `tree` now.

    What an async save of a sharded state records before `save()` returns (see `file_digests`);
    `group` as for `write_sharded`. Not collective.
    """
    rank = dist.get_rank(exchange_group() if group is None else group)
    writer = _ShardWriter(replicated=rank == 0)
    writer.node(tree, "", 0)
    digests = tensor_file_digests("tensors", writer.tensors, empty=False) if rank == 0 else {}
    return digests | tensor_file_digests(
        f"shards-{rank:05d}", {k: t for k, (t, _) in writer.shards.items()}, empty=False
    )


def _write_part(
    tmp: Path,
    target: Path,
    writer: _ShardWriter,
    rank: int,
    before_commit: Callable[[], None] | None,
    check_file: Callable[[str, str], None] | None,
) -> dict[str, Any]:
    """Write this rank's files into `tmp`; what they hold, or the error, as a JSON-able report."""
    files: dict[str, Any] = {}
    index: dict[str, Any] = {}
    try:
        if rank == 0:
            write_tensor_files(
                tmp, "tensors", writer.tensors, files, index, empty=False, check_file=check_file
            )
        shard_index: dict[str, Any] = {}
        write_tensor_files(
            tmp,
            f"shards-{rank:05d}",
            {k: t for k, (t, _) in writer.shards.items()},
            files,
            shard_index,
            empty=False,
            check_file=check_file,
        )
        digests = written_digests(tmp, shard_index)
        shards = {
            key: {
                "file": shard_index[key]["file"],
                "offset": [start] + [0] * (t.dim() - 1),
                "extent": list(t.shape),
                "blake3": digests[key],
            }
            for key, (t, start) in writer.shards.items()
        }
        if before_commit is not None:
            before_commit()
    except Exception as e:
        error = not_written(target, e, "its shards") if isinstance(e, OSError) else e
        return {"error": _described(error)}
    return {
        "error": None,
        "files": files,
        "index": index,
        "shards": shards,
        "sharded": writer.sharded,
    }


def written_digests(tmp: Path, index: Mapping[str, Any]) -> dict[str, str]:
    """Each tensor's BLAKE3, of the bytes its file in `tmp` holds (`index`: key -> its ``file``).

    Read back from the file just written (from the page cache), not hashed from the tensor's memory:
    a tensor written into meanwhile (through ``.data``) would otherwise be recorded with a digest
    its file does not match, and the committed checkpoint would fail its own check. Its header is
    checked against `index` as a load checks it (`functrain.checkpoint.reading.read_header`).
    """
    digests = {}
    for name, entries in index_by_file(index).items():
        fd, size = open_regular(tmp / name, name)
        try:
            head, parsed = read_header(fd, size, name, {"bytes": size}, entries)
            for begin, stop, key, _, _ in parsed:
                at = len(head) + begin
                digests[key] = digest_of_range(fd, at, stop - begin, name, "blake3")
        finally:
            os.close(fd)
    return digests


def _manifest(
    structure: Any,
    writer: _ShardWriter,
    reports: list[dict[str, Any]],
    extras: Any,
    library_version: str,
) -> dict[str, Any]:
    """Rank 0, once every rank's files are durable: the manifest over them all, not yet sealed."""
    files: dict[str, Any] = {}
    index: dict[str, Any] = dict(reports[0]["index"])
    for rank, report in enumerate(reports):
        if report["sharded"] != writer.sharded:
            differ = sorted(set(report["sharded"]) ^ set(writer.sharded))
            raise CheckpointError(
                f"rank {rank} shards other tensors than rank 0 (differing: "
                f"{differ[:10] or 'shapes or dtypes'}): every rank must save the same state"
            )
        files.update(report["files"])
    for key, info in writer.sharded.items():
        shards = sorted(
            (report["shards"][key] for report in reports if key in report["shards"]),
            key=lambda s: s["offset"][0],
        )
        index[key] = {**info, "shards": shards}
    version = SHARDED_FORMAT_VERSION if writer.sharded else writer.version
    return build_manifest(version, structure, index, files, extras, library_version)


# ---------------------------------------------------------------------------------------------
# loading


def rows_wanted(
    template: Mapping[str, Any],
) -> Callable[[Mapping[str, Any]], dict[str, tuple[int, int]]]:
    """For `read_tree(rows=...)`: the rows this rank needs of each tensor the template shards.

    Only tensors the checkpoint holds with the template's global shape and dtype are read by rows;
    any other is read whole, so that the comparison with the template reports it as it is.
    """
    layouts = {
        path: (list(leaf.shape), str(leaf.dtype).removeprefix("torch."), _layout(leaf, path))
        for path, leaf in template.items()
        if is_sharded(leaf)
    }

    def rows(manifest: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        index = manifest["tensors"]
        return {
            path: span
            for path, (shape, dtype, span) in layouts.items()
            if span is not None
            and path in index
            and index[path]["shape"] == shape
            and index[path]["dtype"] == dtype
        }

    return rows


def place(tree: Tree, template: Mapping[str, Any], rows: Mapping[str, tuple[int, int]]) -> Tree:
    """`tree` with each leaf the template holds as a DTensor made one like it (no communication).

    A leaf read by rows (`rows`) is this rank's shard already; one the template replicates is the
    whole tensor. Other leaves stay as loaded (a mismatch the template comparison then reports).
    """

    def placed(path: str, value: Any) -> Any:
        like = template.get(path)
        if not is_sharded(like) or not isinstance(value, torch.Tensor):
            return value
        if path in rows:
            return _wrapped(value, like)
        return (
            value
            if _layout(like, path) is not None or list(value.shape) != list(like.shape)
            else _wrapped(value, like)
        )

    flat, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(
        [placed(path, leaf) for path, leaf in zip(leaves_by_path(tree), flat, strict=True)], spec
    )


def _wrapped(local: torch.Tensor, like: Any) -> Any:
    """`local` (this rank's part) as a DTensor placed as `like` is."""
    return placed_as(local.to(like._local_tensor.device), like)


def placed_like(value: torch.Tensor, like: Any, path: str) -> Any:
    """A whole tensor as `like` holds it: this rank's rows as a DTensor where `like` is one.

    Example:
        >>> placed_like(torch.ones(2), torch.zeros(2), "w")
        tensor([1., 1.])
    """
    if not is_sharded(like):
        return value
    span = _layout(like, path)
    return _wrapped(value if span is None else value[span[0] : span[1]].clone(), like)


def read_for(
    path: str | os.PathLike[str], template: Mapping[str, Any], **read_args: Any
) -> tuple[Tree, dict[str, Any]]:
    """Read a checkpoint for a template's leaves (path -> leaf), a DTensor by this rank's rows.

    Returns ``(tree, manifest)`` as `read_tree` does, the leaves the template shards or replicates
    as DTensors placed like the template's.
    """
    wanted = rows_wanted(template)
    planned: dict[str, tuple[int, int]] = {}

    def rows(manifest: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        planned.update(wanted(manifest))
        return planned

    tree, manifest = read_tree(path, rows=rows, **read_args)
    return place(tree, template, planned), manifest
