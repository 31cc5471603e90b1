"""Test-wide settings: hypothesis profiles ("ci" bounded, the default; "long" for deep runs)."""

import importlib.util
import os
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

# the tests use tiny models: one thread avoids contention overhead that dwarfs the work, and the
# subprocess workers of the resumption properties use one thread too (the same kernels both sides)
torch.set_num_threads(1)

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


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    def rank(item: Any) -> int:
        where = item.nodeid.split("::")[0]
        return LONG_FIRST.index(where) if where in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


def pytest_configure(config: Any) -> None:
    parallel = config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None)
    if parallel and not hasattr(config, "workerinput"):  # the controller of an -n run
        config.pluginmanager.register(FileProgress(config), "functrain-file-progress")
