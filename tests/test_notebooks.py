"""Every notebook in `notebooks/` runs top to bottom without an error.

Each runs in a copy of the folder under a temporary directory (the notebooks write checkpoints
relative to where they run), in a kernel started from this interpreter's ipykernel.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 600


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # jupyter_core warns about its move to platformdirs unless this opts in
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nbformat = pytest.importorskip(
        "nbformat", reason="running the notebooks needs nbformat (pip install functrain[dev])"
    )
    nbclient = pytest.importorskip(
        "nbclient", reason="running the notebooks needs nbclient (pip install functrain[dev])"
    )
    pytest.importorskip(
        "ipykernel", reason="running the notebooks needs ipykernel (pip install functrain[dev])"
    )
    workdir = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, workdir, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    notebook = nbformat.read(workdir / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # jupyter's own deprecations, not functrain's; any other warning still fails the test
        warnings.filterwarnings(
            "ignore",
            category=DeprecationWarning,
            module=r"(jupyter_client|jupyter_core|nbclient|zmq)(\.|$)",
        )
        client.execute()  # raises CellExecutionError naming the failing cell and its traceback
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
