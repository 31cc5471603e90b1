"""The size counts (`tools/sizes.py`): modules by lines, functions over a length, on a tiny tree."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "sizes.py"

# the tool's functions (``tools/`` is a folder of scripts, not a package)
sizes = SimpleNamespace(**runpy.run_path(str(TOOL)))


def function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}():\n{body}"


def test_a_function_counts_from_its_def_to_its_last_line_and_nested_ones_count_too(
    tmp_path: Path,
) -> None:
    # outer: 1 + 60 + inner (1 + 61) = 123 lines; inner: 62; at_limit: 61 - 1 = 60, not over
    outer = function("outer", 60) + function("inner", 61, indent="    ")
    (tmp_path / "a.py").write_text("@staticmethod\n" + outer + "\n" + function("at_limit", 59))
    (tmp_path / "b.py").write_text(function("over", 60))
    assert sizes.long_functions(tmp_path, 60) == [
        (123, f"{tmp_path / 'a.py'}:2 outer"),
        (62, f"{tmp_path / 'a.py'}:63 inner"),
        (61, f"{tmp_path / 'b.py'}:1 over"),
    ]
    assert sizes.module_lines(tmp_path) == [
        (185, str(tmp_path / "a.py")),
        (61, str(tmp_path / "b.py")),
    ]


def test_the_command_prints_the_modules_the_functions_and_their_count(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(function("long", 61) + function("short", 2))
    done = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path), "--top", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [
        f"the 1 largest modules under {tmp_path} (lines):",
        f"    65  {tmp_path / 'm.py'}",
        "functions longer than 60 lines:",
        f"    62  {tmp_path / 'm.py'}:1 long",
        "1 functions longer than 60 lines",
    ]
