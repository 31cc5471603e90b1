"""The sizes a reviewer asks of the package: its largest modules and its longest functions.

Run from the repository root: ``python tools/sizes.py`` prints the 15 largest modules of
``functrain`` (lines, as ``wc -l`` counts them) and every function longer than 60 lines, then the
count. A function's length runs from its ``def`` line to its last line, docstring included
(decorators excluded); nested functions are counted on their own as well as inside their parent.
``--top`` and ``--over`` change the two limits, ``--root`` the folder.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_lines(root: Path) -> list[tuple[int, str]]:
    """Every ``.py`` file under `root` with its line count, the largest first."""
    sizes = [(len(p.read_text().splitlines()), str(p)) for p in sorted(root.rglob("*.py"))]
    return sorted(sizes, key=lambda size: (-size[0], size[1]))


def long_functions(root: Path, over: int) -> list[tuple[int, str]]:
    """Every function under `root` longer than `over` lines, as ``(lines, path:line name)``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > over:
                    found.append((lines, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, key=lambda item: (-item[0], item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("functrain"))
    parser.add_argument("--top", type=int, default=15, help="how many modules to list")
    parser.add_argument("--over", type=int, default=60, help="list functions longer than this")
    args = parser.parse_args()
    print(f"the {args.top} largest modules under {args.root} (lines):")
    for lines, path in module_lines(args.root)[: args.top]:
        print(f"{lines:6d}  {path}")
    found = long_functions(args.root, args.over)
    print(f"functions longer than {args.over} lines:")
    for lines, where in found:
        print(f"{lines:6d}  {where}")
    print(f"{len(found)} functions longer than {args.over} lines")


if __name__ == "__main__":
    main()
