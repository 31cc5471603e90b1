"""Checkpoint throughput against the disk: functrain's save and load next to plain file I/O.

One run prints, for a state of about ``--mb`` megabytes (a `TrainState` of an MLP with AdamW state:
the parameters are a third of the bytes, the two moment buffers the rest), the median seconds of:

* plain write: the checkpoint's bytes written to one file with ``os.write``, then ``os.fsync``
  (the baseline of a save: 1.00);
* save: ``functrain.save(state, path)`` (safetensors + manifest, every piece of every file copied
  into a buffer of the writer's own and hashed there (BLAKE3) in the pass that writes it, fsync of
  every file and directory, atomic exchange);
* plain read: the files of that very checkpoint read back with one ``f.read()`` each (the baseline
  of a load: 1.00);
* load: ``functrain.load(path, like=state)`` (size and header checked, each file read into memory
  of its own and hashed as it is read, the tensors views of that memory, every leaf checked against
  the template);
* manager save, synchronous: ``CheckpointManager(...).save(state)``;
* manager save, async: the time ``CheckpointManager(async_save=True).save(state)`` blocks the
  caller (walking the tree and taking the digest of every file it will write, one pass over the
  state's bytes on every core; the state's CPU tensors are written where they lie, held until
  written), as a fraction of the synchronous manager save;
* async save, whole: that save until ``wait()`` returns (the digests taken in ``save()``, then the
  background write, whose files must match them; the deletions other cases left running are waited
  for before the clock starts), against the plain write.

Ratios are throughput ratios (baseline time / functrain time: 1.0 means as fast as plain I/O).
The disk of a VM swings several-fold between runs, so only ratios measured in one run mean anything:
every repetition runs every case once, in an order that reverses each repetition (ABBA), and the
ratio is taken per repetition before the median. Every file is read back while it is still in the
page cache, for the baseline and for functrain alike.

``--profile`` adds the time of each stage of a save and a load done by hand (building the
safetensors buffers, BLAKE3, write, fsync, read, parse; each alone and overlapped as functrain does
them), and the old path through ``safetensors.torch.save``/``load``, to show where the time goes.

A hash line (BLAKE3 of the same bytes in memory, one thread) shows what hashing costs alone.

Usage:
    python benchmarks/checkpoint_io.py                # ~200 MB, 5 repetitions
    python benchmarks/checkpoint_io.py --mb 2000      # ~2 GB
    python benchmarks/checkpoint_io.py --mb 200 --reps 7 --profile
    python benchmarks/checkpoint_io.py --quick        # smoke test: 16 MB, 2 repetitions
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import files
from functrain.checkpoint import format as serialization
from functrain.checkpoint.tensorfile import _parse_safetensors, safetensors_chunks

TARGETS = {"save": 0.9, "load": 0.85, "async": 0.5}


def build_state(mb: float) -> ft.TrainState:
    """An MLP 1024-h-h-h-1024 whose parameters plus AdamW moments take about `mb` megabytes."""
    target_params = mb * 1e6 / 12  # float32 params, exp_avg, exp_avg_sq
    # 2*1024*h + 2*h*h ~ target_params
    h = int((-2048 + (2048**2 + 8 * target_params) ** 0.5) / 4)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1024, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, 1024),
    )

    def loss_fn(m: ft.BoundModel, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).square().mean()

    state = ft.TrainState.create(model, ft.adamw(1e-3), loss_fn)
    # one step, so the moments hold real numbers (as incompressible as the weights)
    state, _ = ft.train_step(state, torch.randn(8, 1024))
    return state


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def plain_write(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = data
        while view:
            view = view[os.write(fd, view[: 16 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_read(directory: Path) -> list[bytes]:
    """Every file of a checkpoint directory, each read with one ``f.read()``."""
    out = []
    for path in sorted(directory.iterdir()):
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(mb: float, reps: int, directory: Path, profile: bool) -> None:
    state = build_state(mb)
    probe = ft.save(state, directory / "probe")
    nbytes = checkpoint_bytes(probe)
    shutil.rmtree(probe)
    payload = memoryview(
        bytearray(os.urandom(1 << 20)) * (nbytes >> 20) + bytearray(nbytes & ((1 << 20) - 1))
    )
    print(
        f"state: {state!r}; checkpoint {nbytes / 1e6:.1f} MB; {reps} repetitions; directory "
        f"{directory}"
    )

    sync_mgr = ft.CheckpointManager(directory / "mgr-sync", keep_last=1, keep_best=0)
    async_mgr = ft.CheckpointManager(
        directory / "mgr-async", keep_last=1, keep_best=0, async_save=True
    )
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "plain write",
            "save",
            "plain read",
            "load",
            "manager save",
            "async blocked",
            "async whole",
            "blake3",
        )
    }

    def case_plain_write() -> None:
        times["plain write"].append(timed(lambda: plain_write(directory / "plain.bin", payload)))

    def case_save() -> None:
        times["save"].append(timed(lambda: ft.save(state, directory / "ckpt")))

    def case_plain_read() -> None:
        times["plain read"].append(timed(lambda: plain_read(directory / "ckpt")))

    def case_load() -> None:
        times["load"].append(timed(lambda: ft.load(directory / "ckpt", like=state)))

    def case_manager() -> None:
        times["manager save"].append(
            timed(
                lambda: sync_mgr.save(state.replace(step=state.step + len(times["manager save"])))
            )
        )

    def case_async() -> None:
        s = state.replace(step=state.step + len(times["async blocked"]))
        files.wait_for_removals()  # the deletions other cases started are not this save's work
        start = time.perf_counter()
        times["async blocked"].append(timed(lambda: async_mgr.save(s)))
        async_mgr.wait()  # a training loop runs steps meanwhile
        times["async whole"].append(time.perf_counter() - start)

    def case_blake3() -> None:
        times["blake3"].append(timed(lambda: blake3.blake3(payload).hexdigest()))

    # writes come before the reads of what they wrote, in both orders
    order = [
        case_plain_write,
        case_save,
        case_plain_read,
        case_load,
        case_manager,
        case_async,
        case_blake3,
    ]
    reverse = [
        case_blake3,
        case_async,
        case_manager,
        case_save,
        case_plain_write,
        case_load,
        case_plain_read,
    ]
    for rep in range(reps):
        for case in order if rep % 2 == 0 else reverse:
            case()
    async_mgr.close()

    def ratios(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(times[num], times[den], strict=True)]

    rows = [
        ("plain write + fsync", "plain write", None, None),
        (
            "functrain.save",
            "save",
            statistics.median(ratios("plain write", "save")),
            ("save", ">=", TARGETS["save"]),
        ),
        ("plain read", "plain read", None, None),
        (
            "functrain.load(like=)",
            "load",
            statistics.median(ratios("plain read", "load")),
            ("load", ">=", TARGETS["load"]),
        ),
        ("CheckpointManager.save (sync)", "manager save", None, None),
        (
            "CheckpointManager.save (async): caller blocked",
            "async blocked",
            statistics.median(ratios("async blocked", "manager save")),
            ("async", "<=", TARGETS["async"]),
        ),
        (
            "CheckpointManager.save (async): until wait()",
            "async whole",
            statistics.median(ratios("plain write", "async whole")),
            None,
        ),
        ("BLAKE3 of the same bytes, one thread", "blake3", None, None),
    ]
    print(f"\n| {'case':48s} | median s | MB/s   | ratio | target |")
    print(f"|{'-' * 50}|----------|--------|-------|--------|")
    for label, key, ratio, target in rows:
        med = statistics.median(times[key])
        ratio_s = f"{ratio:5.2f}" if ratio is not None else "     "
        if target is None:
            target_s = "      "
        else:
            met = ratio >= target[2] if target[1] == ">=" else ratio <= target[2]
            target_s = f"{target[1]}{target[2]:<4} {'ok' if met else 'MISS'}"
        print(f"| {label:48s} | {med:8.3f} | {nbytes / 1e6 / med:6.0f} | {ratio_s} | {target_s} |")
    print(
        "\nratios: save, load and async until wait() = plain time / functrain time (throughput "
        "ratio, per repetition, median);"
    )
    print(
        "async = time the caller is blocked / synchronous manager save time (per repetition, "
        "median)."
    )
    for label, key, base in (
        ("save", "save", "plain write"),
        ("load", "load", "plain read"),
        ("async until wait()", "async whole", "plain write"),
    ):
        spread = ratios(base, key)
        print(f"{label} ratio per repetition: " + " ".join(f"{r:.2f}" for r in spread))
    print(
        f"Load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other "
        "jobs on the cores lower the ratios: functrain hashes on a second core)."
    )
    if profile:
        profile_stages(state, directory, reps)


def profile_stages(state: ft.TrainState, directory: Path, reps: int) -> None:
    """Time each stage of a save and a load, done by hand as `functrain.checkpoint.format` does."""
    import safetensors.torch

    writer = serialization.TreeWriter()
    writer.node(state.tree(), "", 0)
    tensors = writer.tensors
    stages: dict[str, list[float]] = {}

    def stage(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        stages.setdefault(name, []).append(time.perf_counter() - start)
        return out

    path = directory / "profile.safetensors"
    reused = {k: torch.empty_like(v) for k, v in tensors.items()}
    for k, v in reused.items():
        v.copy_(tensors[k])  # touch every page once: a buffer kept from the last save
    for _ in range(reps):
        stage(
            "save: snapshot copy of every tensor (async save)",
            lambda: {k: v.to("cpu", copy=True) for k, v in tensors.items()},
        )
        stage(
            "save: snapshot copy into buffers kept from the last save",
            lambda: [reused[k].copy_(v) for k, v in tensors.items()],
        )
        chunks = stage(
            "save: safetensors header + views of the tensors", safetensors_chunks, tensors
        )
        stage("save: BLAKE3 of all bytes, alone", _hash_each, chunks)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stage("save: os.write of all bytes, alone (page cache)", _write_each, fd, chunks)
        stage("save: os.fsync of the file", os.fsync, fd)
        os.close(fd)
        path.unlink()
        stage(
            "save: staged copy + BLAKE3 overlapped with the write + fsync (write_file)",
            files.write_file,
            path,
            chunks,
        )
        stage("save: os.fsync of a directory", files.fsync_dir, directory)
        del chunks
        nbytes = path.stat().st_size
        buf = torch.empty(nbytes, dtype=torch.uint8)
        stage(
            "load: read into a fresh torch buffer, alone", _readinto, path, memoryview(buf.numpy())
        )
        huge = files.allocate(nbytes, path.name)
        stage(
            "load: read into fresh huge pages (allocate), alone",
            _readinto,
            path,
            memoryview(huge.numpy()),
        )
        del huge
        stage("load: BLAKE3 of all bytes, alone", blake3.blake3, buf.numpy())
        del buf
        data = stage(
            "load: read into memory of its own + BLAKE3 overlapped (read_hashed)",
            _read_fresh,
            path,
            nbytes,
        )
        stage(
            "load: parse header, tensors as views of the buffer",
            _parse_safetensors,
            path.name,
            data,
        )
        del data
        raw = stage(
            "old save: safetensors.torch.save (one bytes object)", safetensors.torch.save, tensors
        )
        stage("old load: safetensors.torch.load(bytes)", safetensors.torch.load, raw)
        del raw
        path.unlink()
    print("\nstages (median seconds over the repetitions; 'alone' = not overlapped with anything):")
    for name, values in stages.items():
        print(f"  {name:58s} {statistics.median(values):7.3f}")


def _hash_each(chunks: list[memoryview]) -> list[blake3.blake3]:
    return [blake3.blake3(c) for c in chunks]


def _write_each(fd: int, chunks: list[memoryview]) -> None:
    for c in chunks:
        view = c
        while view:
            view = view[os.write(fd, view) :]


def _readinto(path: Path, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(out):
            pos += f.readinto(out[pos : pos + (8 << 20)])


def _read_fresh(path: Path, nbytes: int) -> torch.Tensor:
    fd = os.open(path, os.O_RDONLY)
    try:
        data, _ = files.read_hashed(fd, 0, nbytes, path.name, "blake3")
    finally:
        os.close(fd)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=200.0, help="state size in megabytes (default 200)"
    )
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 MB, 2 repetitions")
    parser.add_argument(
        "--profile", action="store_true", help="also time each stage of a save and a load"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write (default: a temporary directory under the current one)",
    )
    args = parser.parse_args(argv)
    mb, reps = (16.0, 2) if args.quick else (args.mb, args.reps)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    directory = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or Path.cwd()))
    try:
        run(mb, reps, directory, args.profile)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
