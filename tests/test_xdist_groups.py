"""The root ``conftest.py`` under ``pytest -n --dist loadgroup``: the tests marked ``xdist_group``
(those that launch process groups) named by their group, the name pytest-xdist's scheduler keeps
on one worker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from conftest import keep_groups


class Item:
    """A collected test as `keep_groups` reads it: its id, and its marks."""

    def __init__(self, template: Any, nodeid: str, *groups: str) -> None:
        self._id = type(template._id).parse(nodeid)
        self.marks = [pytest.mark.xdist_group(group).mark for group in groups]

    @property
    def nodeid(self) -> str:
        return str(self._id)

    def iter_markers(self, name: str) -> Any:
        return iter(self.marks if name == "xdist_group" else [])


def test_a_grouped_test_is_named_by_its_group_under_loadgroup_once(
    request: pytest.FixtureRequest,
) -> None:
    if not hasattr(request.node, "_id"):
        pytest.skip("pytest before 9.2: pytest-xdist names the groups itself")
    items = [
        Item(request.node, "tests/a.py::test_launch[2]", "ports"),
        Item(request.node, "tests/a.py::test_launch[4]@ports", "ports"),  # named by xdist
        Item(request.node, "tests/a.py::test_two", "ports", "gpu"),
        Item(request.node, "tests/b.py::test_alone"),
    ]
    keep_groups(SimpleNamespace(option=SimpleNamespace(loadgroup=True)), items)
    assert [item.nodeid for item in items] == [
        "tests/a.py::test_launch[2]@ports",
        "tests/a.py::test_launch[4]@ports",
        "tests/a.py::test_two@gpu_ports",
        "tests/b.py::test_alone",
    ]
    # without --dist loadgroup no test is renamed
    other = [Item(request.node, "tests/a.py::test_launch[2]", "ports")]
    keep_groups(SimpleNamespace(option=SimpleNamespace()), other)
    assert other[0].nodeid == "tests/a.py::test_launch[2]"
