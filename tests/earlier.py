"""Checkpoints an earlier functrain wrote, resumed by today's, imported as `tests.earlier`.

Each fixture directory (``tests/core/golden``, ``tests/optim/golden``) keeps the script that wrote
it beside it: run with the functrain of that time, it trained a run, saved it inside (``saved``)
and at its end (``continued``). The floats of those files come from the CPU that wrote them, and
CPU kernels round differently from one instruction set to another (AVX-512, AVX2, none): a run
continued here is not bitwise the ``continued`` written there. So a test continues ``saved`` here
twice, once as loaded (the convention it records or implies) and once in a state asking for that
convention explicitly (`tensors_in`), and compares the two bit for bit; of ``continued`` it checks
that it loads and that the leaves no float kernel computes (`assert_exact_leaves_equal`) are the
run's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import functrain as ft
from functrain.tree import leaves_by_path
from tests.comparisons import assert_trees_equal


def writer(path: Path) -> ModuleType:
    """The script at `path` that wrote a fixture, imported: its ``run``, ``batches``, ``HERE``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensors_in(path: Path, template: ft.TrainState) -> ft.TrainState:
    """`template` holding the tensors of the checkpoint at `path`, under the template's own
    optimizer and options, whatever the checkpoint records of its conventions (no fingerprint is
    compared: the way to continue the same tensors under a convention `load` would not choose)."""
    return template.with_tree(ft.load(path, like=template.tree()))


def assert_exact_leaves_equal(expected: Any, got: Any) -> None:
    """The leaves of `got` that no float kernel computes (counters, flags, the RNG state) are
    `expected`'s, bit for bit, in trees of the same structure; floating leaves are left out.

    For a run continued here against one written on another CPU, whose floats round otherwise.
    """
    floats = [
        path
        for path, leaf in leaves_by_path(expected.tree()).items()
        if isinstance(leaf, float) or (isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
    ]
    assert_trees_equal(expected.tree(), got.tree(), "the exact leaves", ignore=floats)
