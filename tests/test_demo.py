"""The demo (the README's main job) runs end to end and writes what it promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from functrain import demo  # noqa: E402


def test_demo_trains_saves_logs_plots_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo.main(["--out", str(tmp_path), "--epochs", "3", "--no-progress"])
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy of the best checkpoint: ([0-9.]+)", out).group(1))
    assert accuracy > 0.85  # three epochs; the full demo reaches >= 0.95
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("best-") for p in (tmp_path / "checkpoints").iterdir())
    # resuming a finished run trains no further and reports the same result
    demo.main(["--out", str(tmp_path), "--epochs", "3", "--no-progress", "--resume"])
    again = capsys.readouterr().out
    assert (
        re.search(r"test accuracy of the best checkpoint: ([0-9.]+)", again).group(1)
        == f"{accuracy:.4f}"
    )
