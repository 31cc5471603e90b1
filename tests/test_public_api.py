"""The public surface: every public name is importable from `functrain`."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import functrain as ft

# the public names as they stood before the package was grouped by layer: none may be lost
PUBLIC_BEFORE_LAYOUT = """
BatchError Batcher BoundModel Callback CheckpointCorruptError CheckpointError CheckpointManager
CompiledStep ConfigError ConsoleLogger EarlyStopping EmaState EmptyState FitResult FunctrainError
History IterableSource JsonlLogger LRMonitor LeafDiff LossError NonFiniteError ParamStep Profiler
ProgressBar Ratio Run SampleText StateMismatchError StepOptions TensorBoardLogger TrainState
Transform accumulate adagrad adam adamw add_decayed_weights all_finite apply_updates as_tensors
assert_states_equal chain check_resumption check_skip_limits clip_by_global_norm clip_by_value
compile_step diff_states distributed dynamic_loss_scale ema eval_step evaluate find_loss_scale
fingerprint fit generate identity lion load masked observe_plateau on radam reduce_on_plateau
rmsprop sample_logits save scale_by_adagrad scale_by_adam scale_by_learning_rate scale_by_lion
scale_by_radam scale_by_rms schedules sgd skip_nonfinite testing top_k_filter top_p_filter trace
train_step transform_metrics
""".split()


def test_all_lists_every_public_name_once_and_each_imports() -> None:
    assert len(ft.__all__) == len(set(ft.__all__))
    for name in ft.__all__:
        assert getattr(ft, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from functrain import *", namespace)
    assert set(ft.__all__) <= set(namespace)


def test_no_public_name_of_before_the_layout_is_lost() -> None:
    assert sorted(set(PUBLIC_BEFORE_LAYOUT) - set(ft.__all__) - set(ft._WITHDRAWN)) == []


def test_a_withdrawn_name_says_what_took_its_place() -> None:
    assert not set(ft._WITHDRAWN) & set(ft.__all__)  # (listed no more)
    for name, why in ft._WITHDRAWN.items():
        with pytest.raises(AttributeError, match=f"functrain.{name} was withdrawn: "):
            getattr(ft, name)
        assert why


def test_public_classes_and_functions_are_listed_in_all() -> None:
    # anything public that `functrain` holds, other than its subpackages, is in __all__
    listed = set(ft.__all__)
    unlisted = [
        name
        for name, value in vars(ft).items()
        if not name.startswith("_")
        and name not in listed
        and not isinstance(value, types.ModuleType)
    ]
    assert unlisted == []


def test_an_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ft.nonexistent  # type: ignore[attr-defined]  # noqa: B018


def test_the_public_schedules_module_imports_without_warning() -> None:
    module = importlib.import_module("functrain.schedules")
    assert ft.schedules is module
    optim_schedules = importlib.import_module("functrain.optim.schedules")
    interop_schedulers = importlib.import_module("functrain.interop.schedulers")
    assert {name: getattr(module, name) for name in module.__all__} == {
        **{name: getattr(optim_schedules, name) for name in optim_schedules.__all__},
        "from_torch": interop_schedulers.from_torch,
    }


def test_subpackages_name_what_they_offer() -> None:
    for package in ("optim", "core", "checkpoint", "driver", "distributed", "integrations"):
        module = importlib.import_module(f"functrain.{package}")
        assert module.__all__, package
        for name in module.__all__:
            assert getattr(module, name) is not None


# the layers, bottom up (docs/architecture.md): a module imports only from its own layer or below
LAYERS = {
    "errors": 0, "tree": 0,
    "distributed": 1,
    "optim": 2,
    "core": 3,
    "checkpoint": 4,
    "driver": 5,
    "generation": 6, "testing": 6, "demo": 6, "integrations": 6,
}  # fmt: skip


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "functrain" else None


def test_imports_run_down_the_layers() -> None:
    import ast
    from pathlib import Path

    root = Path(ft.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        name = ".".join(("functrain", *path.relative_to(root).with_suffix("").parts))
        own = _layer(name)
        if own is None:  # the package itself and schedules.py sit above every layer
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = (
                    [node.module]
                    if node.module != "functrain"
                    else [f"functrain.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target == "functrain.__version__":  # read when writing a manifest
                    continue
                layer = _layer(target)
                if layer is not None and layer > own:
                    upward.append(f"{name} imports {target}")
    assert upward == []


def test_the_integrations_import_their_packages_only_when_a_callback_is_built() -> None:
    pytest.importorskip("optuna")
    code = (
        "import sys, functrain as ft\n"
        "loaded = lambda: sorted(m for m in ('wandb', 'optuna', 'functrain.integrations.wandb', "
        "'functrain.integrations.optuna') if m in sys.modules)\n"
        "print(loaded())\n"
        "classes = ft.WandbLogger, ft.OptunaPruning\n"
        "print(loaded(), [c.__module__ for c in classes])\n"
        "ft.OptunaPruning(None)\n"
        "print(loaded())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert (
        out[1] == "['functrain.integrations.optuna', 'functrain.integrations.wandb'] "
        "['functrain.integrations.wandb', 'functrain.integrations.optuna']"
    )
    assert out[2] == "['functrain.integrations.optuna', 'functrain.integrations.wandb', 'optuna']"


def test_importing_functrain_imports_no_compiler() -> None:
    # torch's dynamo and inductor take a second to import: a step that compiles imports them
    code = (
        "import sys, functrain\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
