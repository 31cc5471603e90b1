"""What a load costs before it refuses: files with holes, and loads the memory cannot hold.

A hole has no disk blocks and reads as zeros at memory speed: a crafted file can declare a
gigabyte it does not hold, with a header and a re-sealed manifest that agree, so that only its
digest refuses it, once every byte is read. It must be refused before the load allocates its size;
an honest file with holes (zeros left sparse by a copy, or by a file system that compresses) must
still load.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import blake3
import pytest
import torch

import functrain as ft
from functrain.checkpoint import files, reading
from functrain.checkpoint import format as ser
from functrain.errors import CheckpointCorruptError, CheckpointMemoryError
from tests.checkpoint.test_serialization import read_manifest_json, write_manifest
from tests.models import loss_fn

TENSORS = "tensors-00000.safetensors"
BLOCK = 4096


def sparse_copy(path: Path) -> None:
    """Rewrite `path` with every all-zero, block-aligned 4 KiB range left as a hole."""
    raw = path.read_bytes()
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for at in range(0, len(raw), BLOCK):
            block = raw[at : at + BLOCK]
            if block.count(0) != len(block):
                os.pwrite(fd, block, at)
        os.ftruncate(fd, len(raw))
    finally:
        os.close(fd)


def has_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return files.holes_in(fd, 0, path.stat().st_size)
    finally:
        os.close(fd)


@pytest.fixture
def mostly_zeros(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint whose tensor file is mostly zeros, left sparse (skipped where none can be)."""
    tree = {"z": torch.zeros(1 << 20), "w": torch.arange(3000.0), "tail": torch.zeros(5000)}
    d = ft.save(tree, tmp_path / "ckpt")
    sparse_copy(d / TENSORS)
    if not has_holes(d / TENSORS):
        pytest.skip("this file system keeps no holes")
    return d, tree


def test_an_honest_checkpoint_with_holes_loads_bit_for_bit(
    mostly_zeros: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, tree = mostly_zeros
    hashed: list[int] = []
    real = reading.digest_of_range
    monkeypatch.setattr(
        reading,
        "digest_of_range",
        lambda fd, at, n, *rest: hashed.append(n) or real(fd, at, n, *rest),
    )
    loaded = ser.read_tree(d)[0]
    assert all(torch.equal(loaded[k], tree[k]) for k in tree)
    assert hashed == [(d / TENSORS).stat().st_size]  # verified through a small buffer first


def test_a_dense_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = ft.save({"w": torch.randn(1 << 18)}, tmp_path / "ckpt")
    monkeypatch.setattr(reading, "digest_of_range", lambda *a: pytest.fail("a second pass"))
    ft.load(d)


def test_a_file_with_holes_that_does_not_verify_is_refused_before_its_size_is_allocated(
    mostly_zeros: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, _ = mostly_zeros
    m = read_manifest_json(d)
    m["files"][TENSORS]["blake3"] = "0" * 64  # re-sealed: only the file's digest can refuse it
    write_manifest(d, m)
    allocated: list[int] = []
    real = files.allocate
    monkeypatch.setattr(files, "allocate", lambda n, name: allocated.append(n) or real(n, name))
    with pytest.raises(CheckpointCorruptError, match=f"{TENSORS}: has holes where its data should"):
        ft.load(d)
    assert allocated == []


def test_a_shard_read_alone_with_holes_is_checked_against_its_own_digest_first(
    mostly_zeros: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """What a rank of a sharded load reads: one tensor's bytes, by their own digest."""
    d, tree = mostly_zeros
    m = read_manifest_json(d)
    index = reading.index_by_file(m["tensors"])[TENSORS]
    good = files.hasher("blake3")
    good.update(bytes(4 << 20))  # the bytes of torch.zeros(1 << 20), float32
    got = reading.read_tensors(d / TENSORS, m["files"][TENSORS], index, {"z": good.hexdigest()})
    assert torch.equal(got["z"], tree["z"])
    with pytest.raises(CheckpointCorruptError, match="has holes .* digest of tensor 'z'"):
        reading.read_tensors(d / TENSORS, m["files"][TENSORS], index, {"z": "0" * 64})


def crafted_gigabyte(directory: Path) -> Path:
    """A checkpoint whose one tensor file declares 1 GiB of float32 data and holds none of it.

    Its header, the manifest's index and the re-sealed manifest agree; only the file's digest,
    over a gigabyte of zeros read from holes, is wrong.
    """
    d = ft.save({"w": torch.zeros(4)}, directory / "ckpt")
    n = 1 << 28
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}, separators=(",", ":")
    ).encode()
    header += b" " * (-len(header) % 8)
    path = d / TENSORS
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + 4 * n)
    m = read_manifest_json(d)
    m["tensors"]["w"]["shape"] = [n]
    m["files"][TENSORS] = {"blake3": "1" * 64, "bytes": 8 + len(header) + 4 * n}
    write_manifest(d, m)
    return d


def test_a_crafted_gigabyte_of_holes_costs_no_memory_in_a_fresh_process(tmp_path: Path) -> None:
    d = crafted_gigabyte(tmp_path)
    if not has_holes(d / TENSORS):
        pytest.skip("this file system keeps no holes")
    script = textwrap.dedent(
        f"""
        import resource, sys
        import functrain as ft
        from functrain.errors import CheckpointCorruptError, CheckpointMemoryError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            ft.load({str(d)!r})
        except CheckpointCorruptError as e:
            assert "has holes where its data should be" in str(e), e
        except CheckpointMemoryError as e:  # where less than 1 GiB is available
            assert "holes where data should be" in str(e), e
        else:
            sys.exit("loaded")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - before) // 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert int(out.stdout.split()[-1]) <= 64, out.stdout  # MiB over the baseline


def test_a_load_the_memory_available_now_cannot_hold_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = ft.save({"w": torch.randn(1 << 16)}, tmp_path / "ckpt")
    monkeypatch.setattr(ser, "available_memory", lambda: 1 << 16)
    monkeypatch.setattr(reading, "read_hashed", lambda *a: pytest.fail("read before refusing"))
    with pytest.raises(
        CheckpointMemoryError, match=r"needs 0.3 MiB of memory for its tensors, and 0.1 MiB are av"
    ):
        ft.load(d)
    with pytest.raises(CheckpointMemoryError):  # cannot say, rather than "not a checkpoint"
        ser.is_checkpoint(d)


def test_restore_latest_raises_on_a_memory_shortage_rather_than_passing_to_an_older_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ft.TrainState.create(torch.nn.Linear(64, 64), ft.sgd(0.1), loss_fn)
    with ft.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(state)
        mgr.save(state.replace(step=state.step + 1))
        monkeypatch.setattr(ser, "available_memory", lambda: 1024)
        with pytest.raises(CheckpointMemoryError):
            mgr.restore_latest(like=state)
        monkeypatch.undo()
        restored = mgr.restore_latest(like=state)
        assert restored is not None and int(restored.step) == int(state.step) + 1


def test_available_memory_is_the_memory_free_now_at_most_the_machine_total() -> None:
    available = files.available_memory()
    if available is None:
        pytest.skip("no way to tell here")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available <= total


def test_a_crafted_file_larger_than_the_memory_available_says_it_holds_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = crafted_gigabyte(tmp_path)
    if not has_holes(d / TENSORS):
        pytest.skip("this file system keeps no holes")
    monkeypatch.setattr(ser, "available_memory", lambda: 512 << 20)
    with pytest.raises(
        CheckpointMemoryError, match=r"hold only 0\.\d MiB on disk \(holes .* remove it"
    ):
        ft.load(d)


def test_a_symlinked_tensor_file_is_refused_as_a_link_not_as_a_wrong_size(tmp_path: Path) -> None:
    d = ft.save({"w": torch.ones(3)}, tmp_path / "ckpt")
    (d / TENSORS).rename(tmp_path / "elsewhere")
    (d / TENSORS).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointCorruptError, match="is a symbolic link"):
        ft.load(d)


def cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_headroom_is_the_least_over_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    mib = 1 << 20
    root = cgroup_tree(
        tmp_path / "fs",
        {
            # the job: 1 GiB limit, 900 MiB used of which 300 MiB page cache -> 424 MiB
            "job/memory.max": str(1024 * mib),
            "job/memory.current": str(900 * mib),
            "job/memory.stat": f"anon {600 * mib}\nfile {300 * mib}\nshmem 0\n",
            # the task inside it: no limit of its own
            "job/task/memory.max": "max",
            "job/task/memory.current": str(900 * mib),
            "job/task/memory.stat": f"anon {600 * mib}\nfile {300 * mib}\n",
        },
    )
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job/task\n")
    assert files._cgroup_available(str(membership), str(root)) == 424 * mib
    (root / "job/memory.max").write_text("max")  # no limit anywhere
    assert files._cgroup_available(str(membership), str(root)) is None


def test_cgroup_v1_headroom_uses_the_hierarchical_limit_and_counts_the_page_cache(
    tmp_path: Path,
) -> None:
    mib = 1 << 20
    root = cgroup_tree(
        tmp_path / "fs",
        {
            "memory/pod/c1/memory.limit_in_bytes": str(1 << 62),
            "memory/pod/c1/memory.usage_in_bytes": str(700 * mib),
            "memory/pod/c1/memory.stat": (
                f"rss {500 * mib}\nhierarchical_memory_limit {2048 * mib}\n"
                f"total_active_file {100 * mib}\ntotal_inactive_file {100 * mib}\n"
            ),
        },
    )
    membership = tmp_path / "cgroup"
    membership.write_text("5:cpu,cpuacct:/pod/c1\n4:memory:/pod/c1\n0::/\n")
    assert files._cgroup_available(str(membership), str(root)) == (2048 - 700 + 200) * mib


def test_an_async_save_whose_digests_fail_raises_from_the_background_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every rank of a sharded save reports a failure together, none waiting for the rest."""
    from functrain.checkpoint import manager as manager_module

    def failing(tree: object) -> dict[str, str]:
        raise MemoryError("no room for a clone")

    monkeypatch.setattr(manager_module, "file_digests", failing)
    state = ft.TrainState.create(torch.nn.Linear(4, 4), ft.sgd(0.1), loss_fn)
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        path = mgr.save(state)  # returns: the failure is the background save's
        with pytest.raises(ft.CheckpointError, match="no room for a clone"):
            mgr.wait()
        assert not path.exists() and mgr.all() == []


STARVED_LOADS = textwrap.dedent(
    """
    import os, resource, sys, warnings
    import torch
    import functrain as ft
    from functrain.errors import CheckpointMemoryError
    from tests.models import loss_fn

    warnings.simplefilter("error")  # a newer checkpoint skipped for an older one is a warning
    directory, size, extras, fork = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    state = ft.TrainState.create(torch.nn.Linear(1024, 1024), ft.sgd(0.1), loss_fn)
    manager = ft.CheckpointManager(directory, readonly=True)
    if fork:  # the parent's load started BLAKE3's pool, which a forked child has no thread of
        manager.restore_latest(like=state)

    def restore(extra):
        mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, resource.RLIM_INFINITY))
        try:
            return f"step {int(manager.restore_latest(like=state).step)}"
        except CheckpointMemoryError:
            return "CheckpointMemoryError"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)

    for extra in (size + (int(mib) << 20) for mib in extras.split(",")):
        if not fork:
            print(restore(extra), flush=True)
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, restore(extra).encode())
            os._exit(0)
        os.close(write)
        print(os.read(read, 100).decode() or f"died {os.waitpid(pid, 0)[1]}", flush=True)
        os.waitpid(pid, 0)
    """
)


@pytest.mark.parametrize("fork", [False, True], ids=["process", "forked-child"])
def test_a_load_short_of_address_space_restores_the_newest_or_stops_never_an_older_one(
    tmp_path: Path, fork: bool
) -> None:
    """Under an address-space limit just above the checkpoint's size, the threads that hash it
    could not start once its memory was taken: `restore_latest` passed to the older checkpoint
    (a thread that cannot start), or BLAKE3's pool panicked, or the process aborted."""
    state = ft.TrainState.create(torch.nn.Linear(1024, 1024), ft.sgd(0.1), loss_fn)
    with ft.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(state)
        size = (mgr.save(state.replace(step=state.step + 1)) / TENSORS).stat().st_size
    band = "-2,4,6,8,10,12,14,16,300"  # MiB over the checkpoint's size
    out = subprocess.run(
        [sys.executable, "-c", STARVED_LOADS, str(tmp_path / "run"), str(size), band, str(+fork)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    outcomes = out.stdout.split("\n")[:-1]
    assert out.returncode == 0 and len(outcomes) == 9, out.stdout + out.stderr[-2000:]
    assert outcomes[0] == "CheckpointMemoryError", outcomes
    assert set(outcomes[1:]) <= {"step 1", "CheckpointMemoryError"}, outcomes
    assert outcomes[-3:] == ["step 1"] * 3, outcomes


def test_a_load_whose_threads_cannot_start_hashes_in_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread limit (not memory) refuses the hashing threads: the load goes on without them."""
    path = ft.save({"w": torch.arange(1 << 21, dtype=torch.float32)}, tmp_path / "ckpt")

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    class Blake3:
        AUTO = -1

        def __init__(self, max_threads: int = 1) -> None:
            if max_threads == self.AUTO:
                raise PanicException("The global thread pool has not been initialized.")
            self.inner = blake3.blake3(max_threads=1)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(files, "blake3", SimpleNamespace(blake3=Blake3))
    monkeypatch.setattr(files, "_pool_threads", None)
    monkeypatch.setattr(threading.Thread, "start", refused)
    assert torch.equal(ft.load(path)[0]["w"], torch.arange(1 << 21, dtype=torch.float32))
    assert files._pool_threads is False


def test_a_load_short_of_file_descriptors_stops_restore_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ft.TrainState.create(torch.nn.Linear(4, 4), ft.sgd(0.1), loss_fn)
    opened = os.open

    def out_of_descriptors(path: Any, *args: Any) -> int:
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return opened(path, *args)

    with ft.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(state)
        mgr.save(state.replace(step=state.step + 1))
        monkeypatch.setattr(os, "open", out_of_descriptors)
        with pytest.raises(
            CheckpointMemoryError,
            match=r"tensors-00000.safetensors: cannot be opened \(\[Errno 24\] Too many open fil"
            r"es.*"
            r"short of file descriptors",
        ):
            mgr.restore_latest(like=state)


def test_fit_resumes_from_the_newest_checkpoint_when_no_hashing_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It passed over the newest for the one before ("can't start new thread"), trained from
    there and moved `latest` past the newest."""
    data = torch.utils.data.TensorDataset(torch.randn(32, 1024), torch.randn(32, 1024))

    def run(directory: Path, steps: int, resume: bool) -> ft.FitResult:
        torch.manual_seed(0)
        state = ft.TrainState.create(torch.nn.Linear(1024, 1024), ft.sgd(0.1), loss_fn)
        return ft.fit(
            state,
            data,
            batch_size=8,
            max_steps=steps,
            save_every=2,
            checkpoint_dir=directory,
            resume=resume,
            progress=False,
            verbosity="silent",
        )

    run(tmp_path / "run", 3, resume=False)  # checkpoints at steps 2 and 3, 4 MiB each
    shutil.copytree(tmp_path / "run", tmp_path / "free")
    expected = run(tmp_path / "free", 4, resume=True).state
    started = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        if self.name.startswith("functrain-hash"):
            raise RuntimeError("can't start new thread")
        started(self)

    monkeypatch.setattr(threading.Thread, "start", refused)
    monkeypatch.setattr(files, "_pool_threads", False)  # BLAKE3's pool: one thread too
    resumed = run(tmp_path / "run", 4, resume=True)
    assert int(resumed.state.samples_seen) == 32
    assert torch.equal(resumed.state.params["weight"], expected.params["weight"])
