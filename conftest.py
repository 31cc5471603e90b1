"""Test-wide settings: hypothesis profiles ("ci" bounded, the default; "long" for deep runs), and
the inductor cache the compiled tests use.

The suite's compiled steps keep inductor's cache in the checkout (``.cache/``, ignored by git,
kept between runs so that a warm cache still helps; one directory per instruction set, as
`keep_in_checkout` says why), not in the machine's
(``/tmp/torchinductor_$USER``): an entry left truncated there by any process killed mid-compile
fails every later compile of the same code (``ImportError: ... main.so: file too short``).
A library the suite's own killed run left cut short is removed when the next run starts
(`drop_cut_short_libraries`, tested in ``tests/test_inductor_cache.py``); a cache directory the
user chose (``TORCHINDUCTOR_CACHE_DIR``) is left alone.
"""

import importlib.util
import os
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock, Timeout
from hypothesis import HealthCheck, settings

CACHE = Path(__file__).resolve().parent / ".cache"


def keep_in_checkout() -> Path:
    """Point inductor (and triton) at the checkout's cache unless the user chose a directory;
    the directory inductor will use.

    One directory per CPU and kernel instruction set (``ATEN_CPU_CAPABILITY`` picks it, for
    inductor's kernels as for torch's): inductor's key for a compiled graph leaves the set out,
    and the C++ it generated for AVX-512, found in the cache under AVX2, is built for AVX2 and
    computes garbage without an error. Inductor reads the variable at its first compile, not when
    torch is imported; the fresh processes the tests start inherit it.
    """
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        isa = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE / "torchinductor" / isa)
        os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def cut_short(library: Path) -> bool:
    """Whether the ELF file `library` ends before its section header table, which linkers write
    at the end of the file: what a compile killed while it wrote the file leaves."""
    try:
        with library.open("rb") as f:
            header = f.read(64)
        size = library.stat().st_size
    except OSError:  # gone, or not ours to read: not ours to remove either
        return False
    wide = header[4:5] == b"\x02"  # ELFCLASS64
    if header[:4] != b"\x7fELF" or len(header) < (64 if wide else 52):
        return True
    order = "<" if header[5:6] == b"\x01" else ">"
    (offset,) = struct.unpack_from(order + ("Q" if wide else "I"), header, 0x28 if wide else 0x20)
    entry, count = struct.unpack_from(order + "HH", header, 0x3A if wide else 0x2E)
    return offset + entry * count > size


def drop_cut_short_libraries(cache: Path) -> list[Path]:
    """Remove the kernel libraries in inductor's `cache` that a killed compile left cut short;
    those removed.

    Inductor builds a kernel's library in place and, at every later compile of the same code,
    loads the file it finds there: one cut short fails those compiles ("file too short") or
    crashes the process (a bus error) until it is removed, then it is built again. A library
    whose build holds inductor's lock for it (``locks/<key>.lock``) now is left to that build.
    """
    if not sys.platform.startswith("linux") or not cache.is_dir():
        return []
    dropped = []
    # inductor's own names only: a two-letter folder and a library named "c<key>"
    for library in sorted(cache.glob("??/c*.so")):
        if not cut_short(library):
            continue
        try:
            locks = cache / "locks"
            locks.mkdir(exist_ok=True)
            with FileLock(str(locks / f"{library.name.split('.')[0]}.lock"), timeout=0):
                if cut_short(library):
                    library.unlink(missing_ok=True)
                    dropped.append(library)
        except (Timeout, OSError):  # being built now, or not ours to write: left as it is
            continue
    return dropped


def sweep(cache: Path) -> list[Path]:
    """`drop_cut_short_libraries` in the checkout's cache; a directory the user chose for
    inductor (``TORCHINDUCTOR_CACHE_DIR``) is theirs, and left alone."""
    return drop_cut_short_libraries(cache) if cache.is_relative_to(CACHE) else []


# before anything compiles
INDUCTOR_CACHE = keep_in_checkout()

# the tests use tiny models: one thread avoids contention overhead that dwarfs the work, and the
# subprocess workers of the resumption properties use one thread too (the same kernels both sides)
torch.set_num_threads(1)
# the processes the tests start that run several threads (a notebook's kernel, a process group's
# ranks) wait for one another asleep, not spinning: beside the other workers of `-n auto`, which
# keep every core busy, OpenMP's spinning threads ran ten times slower (03_char_lm.ipynb: 314 s
# in the suite, 38 s alone). The wait policy changes no result, only how idle threads wait
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the integrations' doctests need their optional packages (`make test` installs them; `.[dev]` alone
# does not)
collect_ignore = [
    f"functrain/integrations/{name}.py"
    for name in ("wandb", "optuna")
    if importlib.util.find_spec(name) is None
]


class FileProgress:
    """With pytest-xdist (``-n``), one line per test file as its last test finishes, not dots.

    The dots of parallel workers say nothing of where the run is; a line per file (its outcomes, the
    seconds since its first test ended, the share of the suite done) tells slow from hung.
    Failures still print their ``F`` and their report at the end.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.total: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.outcomes: dict[str, dict[str, int]] = {}
        self.first: dict[str, float] = {}
        self.finished = 0

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if not self.total:  # every worker collects the same tests
            for nodeid in ids:
                where = nodeid.split("::")[0]
                self.total[where] = self.total.get(where, 0) + 1

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: Any, config: Any) -> Any:
        if report.passed and report.when == "call":
            return "passed", "", "PASSED"
        if report.skipped and not hasattr(report, "wasxfail"):
            return "skipped", "", "SKIPPED"
        return None

    def pytest_runtest_logreport(self, report: Any) -> None:
        where = report.nodeid.split("::")[0]
        outcomes = self.outcomes.setdefault(where, {})
        self.first.setdefault(where, time.monotonic())
        if report.failed:
            outcomes["failed"] = outcomes.get("failed", 0) + 1
        elif report.skipped and report.when != "teardown":
            outcomes["skipped"] = outcomes.get("skipped", 0) + 1
        if report.when != "teardown":
            return
        self.finished += 1
        self.done[where] = self.done.get(where, 0) + 1
        if self.done[where] == self.total.get(where, -1):
            failed, skipped = outcomes.get("failed", 0), outcomes.get("skipped", 0)
            passed = self.done[where] - failed - skipped
            counts = ", ".join(
                f"{n} {what}"
                for n, what in ((passed, "passed"), (skipped, "skipped"), (failed, "FAILED"))
                if n
            )
            share = 100 * self.finished // max(1, sum(self.total.values()))
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            reporter.ensure_newline()
            reporter.write_line(
                f"[{share:3d}%] {where}: {counts} ({time.monotonic() - self.first[where]:.0f} s)"
            )


# the longest files, started first: under pytest -n the workers then share the many short tests
# at the end, instead of one worker running a long file alone while the other idles
LONG_FIRST = (
    "tests/test_notebooks.py",
    "tests/distributed/test_distributed.py",
    "property_tests/test_fit_resumption.py",
    "tests/checkpoint/test_sharded_checkpoints.py",
    "tests/driver/test_loader_resume.py",
)


def keep_groups(config: Any, items: list[Any]) -> None:
    """Under ``--dist loadgroup``, each test marked ``xdist_group`` named by its group as
    pytest-xdist names it (``<id>@<group>``, the name its scheduler groups by).

    pytest-xdist writes the name into ``item._nodeid``, which pytest 9.2 no longer reads (its ids
    are structured: pytest-dev/pytest-xdist#1386): the mark then groups nothing, the tests that
    launch process groups run on both workers side by side, and a module's fixtures (one launch
    read by several tests) are set up again on each worker. Where xdist's name took, it is kept.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(names))
        parse = getattr(type(getattr(item, "_id", None)), "parse", None)  # (pytest 9.2's ids)
        if names and parse is not None and not item.nodeid.endswith(suffix):
            item._id = parse(item.nodeid + suffix)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own naming, which it completes
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    def rank(item: Any) -> int:
        where = item.nodeid.split("::")[0]
        return LONG_FIRST.index(where) if where in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
    keep_groups(config, items)


def pytest_configure(config: Any) -> None:
    if not hasattr(config, "workerinput"):  # once a run, before any worker compiles
        sweep(INDUCTOR_CACHE)
    parallel = config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None)
    if parallel and not hasattr(config, "workerinput"):  # the controller of an -n run
        config.pluginmanager.register(FileProgress(config), "functrain-file-progress")
