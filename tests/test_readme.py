"""The README's examples run as written (except the one that needs wandb)."""

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
    if "wandb" in code:
        # defining the class must work; using it needs wandb
        namespace: dict = {}
        exec(compile(code, f"README.md[{index}]", "exec"), namespace)
        assert issubclass(namespace["WandbLogger"], namespace["ft"].Callback)
        return
    exec(compile(code, f"README.md[{index}]", "exec"), {})
    assert capsys.readouterr().out.strip() != ""
