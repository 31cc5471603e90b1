"""The README's examples run as written (those of the trackers where their extras are installed)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    code = BLOCKS[index]
    for extra in ("wandb", "optuna"):  # the extras `make test` installs
        if f"import {extra}" in code:
            pytest.importorskip(extra)
    exec(compile(code, f"README.md[{index}]", "exec"), {})
    assert capsys.readouterr().out.strip() != ""
