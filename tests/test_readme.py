"""The README's examples run as written, in order, as one script (a later block uses what an earlier
one defined); those of the trackers where their extras are installed. The guides' examples are
tests/test_docs.py's."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
EXTRAS = ("wandb", "optuna", "torchmetrics")  # the extras `make test` installs


def test_readme_has_examples():
    assert len(BLOCKS) >= 2  # your own loop, fit


def test_readme_examples_run(capsys):
    namespace: dict[str, object] = {}
    for index, code in enumerate(BLOCKS):
        for extra in EXTRAS:
            if f"import {extra}" in code:
                pytest.importorskip(extra)
        exec(compile(code, f"README.md[{index}]", "exec"), namespace)
        assert capsys.readouterr().out.strip() != "", f"README.md[{index}] prints nothing"


def test_readme_names_every_runtime_dependency_of_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text())
    names = [re.split(r"[<>=!~ \[]", d)[0] for d in pyproject["project"]["dependencies"]]
    said = re.search(
        r"The package itself requires (\w+)\s+packages: (.*?)\(pip", README.read_text(), re.S
    )
    assert said is not None
    numbers = {"six": 6, "seven": 7, "five": 5}
    assert numbers.get(said.group(1)) == len(names)
    assert [n for n in names if f"`{n}" not in said.group(2)] == []
