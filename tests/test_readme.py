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
