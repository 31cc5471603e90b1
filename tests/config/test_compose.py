"""Overrides that name a key the config lacks: a typo is told as one, a real addition as Hydra
tells it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("hydra")

import functrain as ft  # noqa: E402
from functrain.config.cli import main  # noqa: E402

CONFIG = """
epochs: 2
optimizer: {_target_: functrain.sgd, lr: 0.1}
callbacks: [{_target_: functrain.JsonlLogger, path: log.jsonl}]
fit: {max_epochs: "${epochs}", batch_size: 4}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "fit.max_epoch=1",
            "override 'fit.max_epoch=1': fit has no key 'max_epoch' (did you mean 'max_epochs'?); "
            "write fit.max_epochs=1",
        ),
        (
            "optimizer.lrr=0.5",
            "override 'optimizer.lrr=0.5': optimizer has no key 'lrr' (did you mean 'lr'?); "
            "write optimizer.lr=0.5",
        ),
        (
            "callbacks.0.pth=x.jsonl",
            "override 'callbacks.0.pth=x.jsonl': callbacks.0 has no key 'pth' (did you mean "
            "'path'?); write callbacks.0.path=x.jsonl",
        ),
        (  # the top level's keys are free: a new one is offered too
            "epoch=3",
            "override 'epoch=3': the config has no key 'epoch' (did you mean 'epochs'?); write "
            "epochs=3, or +epoch=3 to add 'epoch' as a new key",
        ),
        (
            "optimzer.lr=0.5",
            "override 'optimzer.lr=0.5': the config has no key 'optimzer' (did you mean "
            "'optimizer'?); write optimizer.lr=0.5, or +optimzer.lr=0.5 to add 'optimzer' as a "
            "new key",
        ),
        (
            "fit.zzz=1",
            "override 'fit.zzz=1': fit has no key 'zzz', and fit takes no argument 'zzz'",
        ),
    ],
)
def test_an_override_with_a_typo_says_which_key_was_meant_before_hydras_advice(
    config: Path, override: str, message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=f"^{re.escape(message)}$"):
        ft.load_config(config, ["epochs=3", override])


@pytest.mark.parametrize(
    "override", ["fit.save_every=5", "optimizer.momentum=0.9", "train_size=100"]
)
def test_an_override_that_adds_a_real_key_keeps_hydras_advice(config: Path, override: str) -> None:
    with pytest.raises(
        ft.ConfigError,
        match=rf"Could not override '{override.split('=')[0]}'. To append to your config use "
        rf"\+{re.escape(override)}",
    ):
        ft.load_config(config, [override])
    assert ft.load_config(config, [f"+{override}"])  # as Hydra says


def test_the_command_prints_the_typo_first(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(config), "fit.max_epoch=1", "--print-config"]) == 2
    assert capsys.readouterr().err == (
        "functrain run: override 'fit.max_epoch=1': fit has no key 'max_epoch' (did you mean "
        "'max_epochs'?); write fit.max_epochs=1\n"
    )
