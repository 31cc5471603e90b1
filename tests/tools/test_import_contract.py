"""The import contract (`tools/import_contract.py`): each rule refuses an example; functrain passes.

Each failing example is a tiny package written to `tmp_path`, checked with its own layers; the
problems are compared word for word with what ``make lint`` would print.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "import_contract.py"


def load_tool() -> ModuleType:
    """The tool as a module (``tools/`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("import_contract", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


contract = load_tool()

# pkg's own layers, top down: the package's __init__ and high above low
LAYERS = [["pkg", "pkg.high"], ["pkg.low"]]


def package(tmp_path: Path, files: dict[str, str], name: str = "pkg") -> Path:
    """A package `name` in `tmp_path` holding `files` (path inside the package -> source)."""
    root = tmp_path / name
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_a_clean_package_has_no_problems(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "__init__.py": "from pkg.high import run\n",
            "high.py": """\
                import pkg.low as low
                from pkg.low import scale


                def run():
                    return scale(low.__name__)
                """,
            "low.py": """\
                def scale(x):
                    return _double(x)


                def _double(x):
                    return x * 2
                """,
        },
    )
    assert contract.check(root, layers=LAYERS, inner={}) == []


def test_a_private_name_imported_from_another_module(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {"high.py": "from pkg.low import _x\n", "low.py": "_x = 1\n"},
    )
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'high.py'}:1: imports _x from pkg.low"]


def test_a_private_name_imported_relatively(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {"high.py": "from .low import _x\n", "low.py": "_x = 1\n"},
    )
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'high.py'}:1: imports _x from pkg.low"]


def test_a_private_attribute_through_a_module_alias(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "high.py": """\
                import pkg.low as low


                def run():
                    return low._x
                """,
            "low.py": "_x = 1\n",
        },
    )
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'high.py'}:5: uses _x of pkg.low"]


def test_a_private_attribute_through_a_module_imported_by_name(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "high.py": """\
                from pkg import low


                def run():
                    return low._x
                """,
            "low.py": "_x = 1\n",
        },
    )
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'high.py'}:5: uses _x of pkg.low"]


def test_a_private_attribute_through_a_dotted_module_path(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "high.py": """\
                import pkg.low


                def run():
                    return pkg.low._x
                """,
            "low.py": "_x = 1\n",
        },
    )
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'high.py'}:5: uses _x of pkg.low"]


def test_a_cycle_closed_by_a_function_local_import(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "high.py": "from pkg.low import y\nx = 1\n",
            "low.py": """\
                y = 2


                def f():
                    from pkg.high import x

                    return x
                """,
        },
    )
    problems = contract.check(root, layers=[["pkg"], ["pkg.high", "pkg.low"]], inner={})
    assert problems == [
        "import cycle among 2 modules, the shortest: "
        "pkg.high (line 1) -> pkg.low (line 5) -> pkg.high"
    ]


def test_a_cycle_through_import_module(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "high.py": "from pkg.low import load\n",
            "low.py": """\
                import importlib


                def load():
                    return importlib.import_module("pkg.high")
                """,
        },
    )
    problems = contract.check(root, layers=[["pkg"], ["pkg.high", "pkg.low"]], inner={})
    assert problems == [
        "import cycle among 2 modules, the shortest: "
        "pkg.high (line 1) -> pkg.low (line 5) -> pkg.high"
    ]


def test_a_lower_layer_importing_a_higher_one(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {"high.py": "y = 1\n", "low.py": "from pkg.high import y\n"},
    )
    problems = contract.check(root, layers=[["pkg"], ["pkg.high"], ["pkg.low"]], inner={})
    assert problems == [
        f"{root / 'low.py'}:1: pkg.low imports pkg.high, a layer above it in pkg "
        "(layers, top down: pkg > high > low)"
    ]


def test_a_module_in_no_layer(tmp_path: Path) -> None:
    root = package(tmp_path, {"high.py": "", "low.py": "", "extra.py": ""})
    problems = contract.check(root, layers=LAYERS, inner={})
    assert problems == [f"{root / 'extra.py'}: pkg.extra is in no layer: add it to LAYERS"]


def test_the_layers_inside_a_folder(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "sub/__init__.py": "",
            "sub/top.py": "y = 1\n",
            "sub/bottom.py": "from pkg.sub.top import y\n",
            "sub/loose.py": "",
        },
    )
    inner = {"pkg.sub": [["pkg.sub"], ["pkg.sub.top"], ["pkg.sub.bottom"]]}
    problems = contract.check(root, layers=[["pkg"], ["pkg.sub"]], inner=inner)
    assert problems == [
        f"{root / 'sub' / 'loose.py'}: pkg.sub.loose is in no layer: add it to INNER['pkg.sub']",
        f"{root / 'sub' / 'bottom.py'}:1: pkg.sub.bottom imports pkg.sub.top, a layer above it in "
        "pkg.sub (layers, top down: sub > top > bottom)",
    ]


def test_the_command_line_exit_status(tmp_path: Path) -> None:
    # the command line checks with the tool's own LAYERS: a package named functrain
    root = package(tmp_path, {}, name="functrain")
    clean = subprocess.run(
        [sys.executable, str(TOOL), str(root)], capture_output=True, text=True, check=False
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("import contract: layers kept")

    (root / "stray.py").write_text("")
    broken = subprocess.run(
        [sys.executable, str(TOOL), str(root)], capture_output=True, text=True, check=False
    )
    assert broken.returncode == 1
    expected = f"{root / 'stray.py'}: functrain.stray is in no layer: add it to LAYERS"
    assert broken.stdout.splitlines() == [expected]
    assert "import contract: 1 problems" in broken.stderr


def test_functrain_keeps_the_contract() -> None:
    assert contract.check(REPO / "functrain") == []
