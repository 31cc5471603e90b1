"""A config file is code: targets imported only where the run builds them, what no config may
name, their types checked before any call, and safe mode's allow-list for a config from
elsewhere."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("hydra")

import functrain as ft  # noqa: E402
from functrain.config.cli import main  # noqa: E402


def run_config(**sections: Any) -> dict[str, Any]:
    """A small run's config (only functrain's and torch's targets), `sections` replacing some."""

    def tensors(*shape: int) -> dict[str, Any]:
        return {"_target_": "torch.randn", "_args_": list(shape)}

    return {
        "seed": 0,
        "model": {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2},
        "loss": {"_target_": "functrain.demo.loss_fn", "_partial_": True},
        "optimizer": {"_target_": "functrain.sgd", "lr": 0.1},
        "data": {
            "train": {
                "_target_": "torch.utils.data.TensorDataset",
                "_args_": [
                    tensors(8, 3),
                    {"_target_": "torch.randint", "_args_": [0, 2, [8]]},
                ],
            }
        },
        "fit": {"batch_size": 4, "max_steps": 1, "progress": False, "verbosity": "silent"},
        **sections,
    }


def shell_attack(folder: Path) -> dict[str, Any]:
    """A pickle that runs a shell command, written by Path.write_text and run by numpy.load."""
    payload = pickle.dumps(
        _Touch(str(folder / "pwned")), protocol=0
    ).decode()  # protocol 0 is text: write_text can write it
    path = str(folder / "data.pkl")
    return run_config(
        state={
            "seed": {
                "_target_": "pathlib.Path.write_text",
                "_args_": [{"_target_": "pathlib.Path", "_args_": [path]}, payload],
            }
        },
        data={
            **run_config()["data"],
            "eval": {"_target_": "numpy.load", "file": path, "allow_pickle": True},
        },
    )


class _Touch:
    """Unpickled, runs ``touch path`` through os.system."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.path}",))


def open_attack(victim: Path) -> dict[str, Any]:
    return run_config(model={"_target_": "builtins.open", "_args_": [str(victim), "w"]})


def test_safe_mode_refuses_the_shell_command_attack_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(shell_attack(tmp_path), safe=True)
    assert str(info.value).splitlines()[1:] == [
        "  - state.seed._target_: safe mode refuses it: pathlib.Path.write_text is outside the "
        "packages safe mode allows (functrain, torch; add one with allow)",
        "  - state.seed._args_.0._target_: safe mode refuses it: pathlib.Path is outside the "
        "packages safe mode allows (functrain, torch; add one with allow)",
        "  - data.eval._target_: safe mode refuses it: numpy.load is outside the packages safe "
        "mode allows (functrain, torch; add one with allow)",
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing run


def test_a_trusted_config_is_refused_the_shell_command_attack_before_anything_runs(
    tmp_path: Path,
) -> None:
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(shell_attack(tmp_path))
    fix = "a config file calls what it names: do this in a function of your own, and name that"
    assert str(info.value).splitlines()[1:] == [
        "  - state.seed._target_: refused, trusted or not: pathlib.Path.write_text is in pathlib, "
        f"which writes, moves or deletes files; {fix}",
        "  - data.eval._target_: refused, trusted or not: numpy.load loads pickles or other Python "
        f"objects (loading one runs code); {fix}",
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing run


@pytest.mark.parametrize(
    ("target", "args", "built"),
    [
        ("pathlib.Path", ["runs", "a"], Path("runs/a")),
        ("os.path.join", ["runs", "a"], "runs/a"),
    ],
)
def test_a_path_is_built_where_its_module_is_refused(
    target: str, args: list, built: object
) -> None:
    import pydoc

    from functrain.config.targets import refused_path_problem, refused_target_problem

    assert refused_path_problem(target) is None
    assert refused_target_problem(target, pydoc.locate(target)) is None
    assert pydoc.locate(target)(*args) == built  # type: ignore[misc]
    assert refused_path_problem("pathlib.Path.write_text") is not None


_CODE = "runs code or processes, or reaches any object"
_FILES = "writes, moves or deletes files"
_PICKLES = "loads pickles or other Python objects (loading one runs code)"
REFUSED_TRUSTED = {
    "os_system": ("os.system", f"os.system is in os, which {_CODE}"),
    "subprocess": ("subprocess.run", f"subprocess.run is in subprocess, which {_CODE}"),
    "eval": ("builtins.eval", f"builtins.eval {_CODE}"),
    "exec": ("builtins.exec", f"builtins.exec {_CODE}"),
    "getattr": ("builtins.getattr", f"builtins.getattr {_CODE}"),
    "import": (
        "importlib.import_module",
        f"importlib.import_module is in importlib, which {_CODE}",
    ),
    "shutil": ("shutil.rmtree", f"shutil.rmtree is in shutil, which {_FILES}"),
    "unlink": ("pathlib.Path.unlink", f"pathlib.Path.unlink is in pathlib, which {_FILES}"),
    "numpy_save": ("numpy.save", f"numpy.save {_FILES}"),
    "pickle": ("pickle.loads", f"pickle.loads is in pickle, which {_PICKLES}"),
    "joblib": ("joblib.load", f"joblib.load is in joblib, which {_PICKLES}"),
    "torch_load": ("torch.load", f"torch.load {_PICKLES}"),
    "torch_load_through_an_allowed_module": (
        "torch.nn.functional.torch.load",
        f"torch.nn.functional.torch.load is in torch.serialization, which {_PICKLES}",
    ),
    "numpy_load_by_its_home": (
        "numpy.lib.npyio.load",
        f"numpy.lib.npyio.load is in numpy.lib.npyio, which {_PICKLES}",
    ),
    "numpy_load_through_another_name": (
        "numpy.lib._npyio_impl.load",
        f"numpy.lib._npyio_impl.load is in numpy.lib._npyio_impl, which {_PICKLES}",
    ),
    "yaml": ("yaml.unsafe_load", f"yaml.unsafe_load is in yaml, which {_PICKLES}"),
    "storage_from_file": (
        "torch.UntypedStorage.from_file",
        f"torch.UntypedStorage.from_file {_FILES}",
    ),
    "storage_from_file_by_its_home": (
        "torch.storage.UntypedStorage.from_file",
        f"torch.storage.UntypedStorage.from_file {_FILES}",
    ),
    "typed_storage_from_file": (
        "torch.FloatStorage.from_file",
        f"torch.FloatStorage.from_file is torch.storage.TypedStorage.from_file, which {_FILES}",
    ),
    "special_name": (
        "builtins.object.__subclasses__",
        "builtins.object.__subclasses__ names the special attribute '__subclasses__', through "
        "which any object is reached",
    ),
    "a_method_of_a_built_object": (
        "numpy.ndarray.tofile",
        "numpy.ndarray.tofile is a method of numpy.ndarray: a config builds objects with classes "
        "and functions, and calls no method of one it built (the way an object writes or "
        "serializes itself)",
    ),
}


@pytest.mark.parametrize(("path", "message"), REFUSED_TRUSTED.values(), ids=REFUSED_TRUSTED)
def test_a_trusted_config_may_not_name_what_runs_code_writes_files_or_unpickles(
    path: str, message: str
) -> None:
    config = run_config(callbacks=[{"_target_": path}])
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(config)
    assert str(info.value).splitlines()[1:] == [
        f"  - callbacks.0._target_: refused, trusted or not: {message}; a config file calls what "
        "it names: do this in a function of your own, and name that"
    ]


class Holder:
    @staticmethod
    def make() -> int:
        return 1


ALLOWED_TRUSTED = {
    "a_class": "torch.nn.Linear",
    "a_function": "functrain.adamw",
    "a_reader_beside_numpy_load": "numpy.loadtxt",
    "a_classmethod": "functrain.TrainState.create",
    "a_builtin_classmethod": "builtins.dict.fromkeys",
    "a_staticmethod": "tests.config.test_targets.Holder.make",
    "a_builtin_staticmethod": "builtins.str.maketrans",
    "a_method_of_an_object_its_module_holds": "random.seed",
}


@pytest.mark.parametrize("path", ALLOWED_TRUSTED.values(), ids=ALLOWED_TRUSTED)
def test_what_a_trusted_config_may_name_beside_the_refused(path: str) -> None:
    import hydra.utils

    from functrain.config.targets import refused_path_problem, refused_target_problem

    assert refused_path_problem(path) is None
    assert refused_target_problem(path, hydra.utils.get_object(path)) is None


@pytest.mark.parametrize("path", ["torch.UntypedStorage.from_file", "torch.FloatStorage.from_file"])
def test_a_storage_from_a_shared_file_is_refused_before_it_creates_the_file(
    tmp_path: Path, path: str
) -> None:
    target = tmp_path / "created"
    config = run_config(callbacks=[{"_target_": path, "_args_": [str(target), True, 64]}])
    with pytest.raises(ft.ConfigError, match="writes, moves or deletes files"):
        ft.build_run(config)
    assert not target.exists()


@pytest.mark.parametrize("safe", [False, True])
def test_open_with_mode_w_as_the_model_is_refused_before_it_empties_the_file(
    tmp_path: Path, safe: bool
) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    message = (
        r"builtins.open is outside the packages safe mode allows"
        if safe
        else r"model._target_: refused, trusted or not: builtins.open writes, moves or deletes "
        r"files"
    )
    with pytest.raises(ft.ConfigError, match=message):
        ft.build_run(open_attack(victim), safe=safe)
    assert victim.read_text() == "precious"


def test_the_command_refuses_the_attacks_with_safe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    for name, config in {"open": open_attack(victim), "shell": shell_attack(tmp_path)}.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path), "--safe"]) == 2
        assert "safe mode refuses it" in capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "data.pkl").exists()


def test_the_command_refuses_the_shell_command_attack_without_safe_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "shell.yaml"
    path.write_text(yaml.safe_dump(shell_attack(tmp_path)))
    assert main(["run", str(path)]) == 2
    assert "state.seed._target_: refused, trusted or not: pathlib.Path.write_text" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shell.yaml"]  # nothing else written


@pytest.fixture
def noisy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module whose import writes a mark file: importing it shows."""
    mark = tmp_path / "imported"
    (tmp_path / "noisy_target.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).touch()\n\ndef build():\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "noisy_target", raising=False)
    return mark


def test_a_target_under_a_key_the_run_does_not_build_is_refused_and_never_imported(
    noisy_module: Path,
) -> None:
    with pytest.raises(
        ft.ConfigError, match=r"unused: a run has no section 'unused', and nothing builds"
    ):
        ft.build_run(run_config(unused={"_target_": "noisy_target.build"}))
    assert not noisy_module.exists()


def test_safe_loading_imports_no_target_outside_its_packages(
    tmp_path: Path, noisy_module: Path
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {_target_: noisy_target.build, width: 2}\n")
    with pytest.raises(ft.ConfigError, match="model has no key 'widht' \\(did you mean 'width'"):
        ft.load_config(path, ["model.widht=3"], safe=True)  # a typo's lookup imports nothing
    with pytest.raises(
        ft.ConfigError,
        match=r"model._target_: safe mode refuses it: noisy_target.build is outside the packages",
    ):
        ft.load_config(path, safe=True)
    assert not noisy_module.exists()
    with pytest.raises(ft.ConfigError):
        ft.load_config(path, ["model.widht=3"])  # trusted: the lookup imports the target
    assert noisy_module.exists()


REFUSED = {
    "through_an_allowed_module": (
        "torch.nn.functional.torch.load",
        "torch.nn.functional.torch.load is defined in torch.serialization, outside what safe mode "
        "allows",
    ),
    "functrain_internal": (
        "functrain.checkpoint.files.remove_later",
        "functrain.checkpoint.files.remove_later is defined in functrain.checkpoint.files, "
        "outside what safe mode allows",
    ),
    "functrain_writes_files": (
        "functrain.save",
        "functrain.save reads or writes files at a path of its own, or runs a run",
    ),
    "functrain_builds_a_config": (
        "functrain.build_run",
        "functrain.build_run reads or writes files at a path of its own, or runs a run",
    ),
    "special_name": (
        "torch.nn.Module.__subclasses__",
        "torch.nn.Module.__subclasses__ names '__subclasses__': safe mode builds no private or "
        "special name",
    ),
}


@pytest.mark.parametrize(("path", "message"), REFUSED.values(), ids=REFUSED)
def test_safe_mode_refuses_what_its_allow_list_does_not_hold(path: str, message: str) -> None:
    config = run_config(callbacks=[{"_target_": path}])
    with pytest.raises(ft.ConfigError, match="callbacks.0._target_: safe mode refuses it: "):
        ft.build_run(config, safe=True)
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(config, safe=True)
    assert message in str(info.value)


def test_safe_mode_builds_the_demo_and_a_module_added_with_allow() -> None:
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    pytest.importorskip("sklearn")
    config = ft.load_config(
        demo,
        ["~callbacks", "~fit.checkpoint_dir", "~fit.log_file", "~fit.resume", "~fit.keep_last"],
        safe=True,
    )
    assert type(ft.build_run(config, safe=True).state.module).__name__ == "DigitsCNN"
    ours = run_config(loss={"_target_": "tests.models.loss_fn", "_partial_": True})
    with pytest.raises(ft.ConfigError, match="tests.models.loss_fn is outside the packages"):
        ft.build_run(ours, safe=True)
    assert ft.build_run(ours, safe=True, allow=["tests.models"]).state is not None
    with pytest.raises(ft.ConfigError, match=r"allow=\['tests.models'\] widens safe mode"):
        ft.build_run(ours, allow=["tests.models"])


def make_linear() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def make_path() -> str:
    return "nowhere"


def test_a_target_of_a_known_key_is_checked_by_its_type_or_return_annotation() -> None:
    here = "tests.config.test_targets"
    trusted = run_config(model={"_target_": f"{here}.make_linear"})  # unannotated: called
    assert isinstance(ft.build_run(trusted).state.module, torch.nn.Linear)
    wrong = run_config(
        model={"_target_": f"{here}.make_path"},
        optimizer={"_target_": "torch.nn.Identity"},
        fit={
            **run_config()["fit"],
            "checkpoint_dir": {"_target_": "builtins.len", "_args_": ["x"]},
        },
    )
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(wrong)
    assert str(info.value).splitlines()[1:] == [
        f"  - model: expected an nn.Module, got {here}.make_path, a function that returns str "
        "(nothing was called): name a class of that type, or a function annotated to return one",
        "  - optimizer: expected a functrain optimizer (a Transform, e.g. functrain.adamw), got "
        "torch.nn.Identity, a class of another type (nothing was called): name a class of that "
        "type, or a function annotated to return one",
        "  - fit.checkpoint_dir: expected str or pathlib.Path or None, got builtins.len, a "
        "builtin function whose result's type cannot be known before it is called (nothing was "
        "called): name a class of that type, or a function annotated to return one",
    ]


def test_run_help_says_a_config_file_is_trusted_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "A config file is code:" in text and "Run only configs you trust as you trust code" in text
    )
    assert "--safe" in text and "--allow MODULE" in text


@pytest.mark.parametrize("safe", [False, True])
def test_a_target_hidden_in_an_escaped_interpolation_is_refused_before_it_is_built(
    tmp_path: Path, safe: bool
) -> None:
    # Hydra's instantiate resolves a string that reads ${...} again, so an escaped interpolation
    # in the file (a literal after functrain's resolution) became a node with a _target_ that none
    # of functrain's checks saw: it emptied a file, in safe mode too
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    hidden = "\\${oc.create:{_target_: builtins.open, file: " + str(victim) + ", mode: w}}"
    (tmp_path / "run.yaml").write_text(
        "model: {_target_: torch.nn.Linear, in_features: 3, out_features: 2}\n"
        "loss: {_target_: functrain.demo.loss_fn, _partial_: true}\n"
        f"optimizer: {{_target_: functrain.sgd, lr: '{hidden}'}}\n"
        "data: {train: {_target_: torch.utils.data.TensorDataset, _args_: []}}\n"
        "fit: {batch_size: 4, max_steps: 1}\n"
    )
    config = ft.load_config(tmp_path / "run.yaml", safe=safe)
    with pytest.raises(ft.ConfigError, match=r"optimizer.lr: the value .* holds '\$\{' after"):
        ft.build_run(config, safe=safe)
    as_dict = run_config(optimizer={"_target_": "functrain.sgd", "lr": hidden.lstrip("\\")})
    with pytest.raises(ft.ConfigError, match=r"optimizer.lr: the value .* holds '\$\{' after"):
        ft.build_run(as_dict, safe=safe)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("path", ["asyncio.create_subprocess_shell", "asyncio.run"])
def test_asyncio_which_runs_processes_is_refused_trusted_or_not(path: str) -> None:
    from functrain.config.targets import refused_path_problem

    assert "runs code or processes" in (refused_path_problem(path) or "")
