"""Runs from a config file: `functrain run`, Hydra overrides, the config saved and compared on
resume."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the demo's data

import functrain as ft  # noqa: E402
from functrain import demo  # noqa: E402
from functrain.checkpoint.format import read_manifest  # noqa: E402
from functrain.config.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def short(out: Path, *more: str, plot: bool = False) -> list[str]:
    """The demo's config, shortened: a narrow CNN, a few updates, no bar (and no plot)."""
    fast = [
        f"out={out}",
        "epochs=2",
        "model.width=4",
        "fit.max_steps=3",
        "fit.progress=false",
        "fit.verbosity=silent",
    ]
    return [*fast, *([] if plot else ["~callbacks"]), *more]


def test_demo_config_builds_the_demos_run_bit_for_bit(tmp_path: Path) -> None:
    run = ft.build_run(ft.load_config(DEMO, [f"out={tmp_path}", "epochs=4"]))
    state, splits, options = demo.build(4, 64, 3e-3, 0, tmp_path)
    ft.assert_states_equal(run.state, state)
    assert ft.fingerprint(run.state) == ft.fingerprint(
        state
    )  # the optimizer, its schedule, the model's structure
    for a, b in zip((run.train_data, run.eval_data, run.test_data), splits, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
    built = {
        k: v
        for k, v in run.fit_kwargs.items()
        if k
        not in ("callbacks", "progress", "resume", "max_steps", "on_config_change", "config_exempt")
    }
    assert run.fit_kwargs["max_steps"] is None
    assert built == {
        **options,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "log_file": str(tmp_path / "metrics.jsonl"),
    }
    assert type(built["early_stopping"]) is ft.EarlyStopping  # not turned into a DictConfig
    assert [type(c) for c in run.fit_kwargs["callbacks"]] == [demo.PlotCurves]


def test_demo_runs_from_its_config_and_an_override_changes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["run", str(DEMO), *short(tmp_path, "callbacks.0.metrics=[loss,acc]", plot=True)]) == 0
    )
    out = capsys.readouterr().out
    assert "stopped: max_steps after 3 updates" in out and "test_acc: " in out
    manifest = read_manifest(tmp_path / "checkpoints" / "ckpt-000000003-000000003")
    config = manifest["metadata"]["config"]
    assert (
        config["model"]["width"] == 4
        and config["fit"]["max_steps"] == 3
        and config["optimizer"]["lr"]["decay_steps"] == 40
    )
    # the saved config rebuilds the run the checkpoint belongs to
    state = ft.load(
        tmp_path / "checkpoints" / "ckpt-000000003-000000003", like=ft.build_run(config).state
    )
    assert (
        state.params["features.0.weight"].shape == (4, 1, 3, 3) and int(state.step) == 3
    )  # model.width=4, not the file's 32
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_with_a_changed_key_is_refused_naming_it_or_warned_by_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(DEMO), *short(tmp_path)]) == 0
    capsys.readouterr()
    # an exempt key only (training longer): the run continues
    assert main(["run", str(DEMO), *short(tmp_path, "fit.max_steps=4")]) == 0
    assert "after 4 updates" in capsys.readouterr().out
    assert main(["run", str(DEMO), *short(tmp_path, "fit.max_steps=5", "lr=0.01")]) == 2
    err = capsys.readouterr().err
    assert (
        "lr: 0.003 -> 0.01" in err
        and "optimizer.lr.peak_value: 0.003 -> 0.01" in err
        and "optimizer.lr.end_value: 3e-05 -> 0.0001" in err
    )
    assert "max_steps" not in err
    assert (
        sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("ckpt-"))[
            -1
        ]
        == "ckpt-000000004-000000004"
    )
    # a key the checkpoint can take (not the model's or optimizer's, whose names it records)
    with pytest.warns(ft.ConfigChangeWarning, match=r"fit.keep_last: 2 -> 3"):
        assert (
            main(
                [
                    "run",
                    str(DEMO),
                    *short(
                        tmp_path, "fit.max_steps=5", "fit.keep_last=3", "fit.on_config_change=warn"
                    ),
                ]
            )
            == 0
        )
    assert "after 5 updates" in capsys.readouterr().out
    latest = ft.CheckpointManager(tmp_path / "checkpoints", readonly=True).latest()
    assert (
        read_manifest(latest)["metadata"]["config"]["fit"]["keep_last"] == 3
    )  # the new config, from here on


def test_fit_compares_a_config_of_its_own_with_keys_exempted_by_the_user(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 10, (16,)))

    def run(config: dict, **kw: object) -> ft.FitResult:
        state = ft.TrainState.create(torch.nn.Linear(3, 10), ft.sgd(0.1), demo.loss_fn)
        return ft.fit(
            state,
            data,
            batch_size=8,
            max_steps=2,
            progress=False,
            verbosity="silent",
            checkpoint_dir=tmp_path,
            resume=True,
            config=config,
            **kw,
        )

    run({"data": {"root": "/a"}, "tags": ["x"], "fit": {"resume": True}})
    with pytest.raises(
        ft.ConfigError, match=r"(?s)data.root: '/a' -> '/b'.*tags.1: \(not set\) -> 'y'"
    ):
        run({"data": {"root": "/b"}, "tags": ["x", "y"], "fit": {"resume": False}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run({"data": {"root": "/b"}, "tags": ["x", "y"]}, config_exempt=["data.root", "tags"])


def test_bad_configs_are_config_errors_naming_each_key(tmp_path: Path) -> None:
    good = ft.load_config(DEMO, [f"out={tmp_path}"])
    bad = {
        **good,
        "model": {**good["model"], "widht": 8},
        "optimizer": {
            **good["optimizer"],
            "lr": {"_target_": "functrain.schedules.warmup_cosine", "peak_value": 0.1},
        },
        "state": {"ema": 0.9},
        "data": {"train": good["data"]["train"], "valid": good["data"]["eval"]},
        "callbacks": [{"_target_": "functrain.demo.NoSuchCallback"}],
        "fit": {**good["fit"], "eval_data": None, "max_epoch": 3},
    }
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(bad)
    message = str(info.value)
    for expected in (
        "model.widht: functrain.demo.DigitsCNN takes no argument 'widht' (did you mean 'width'?)",
        "optimizer.lr: functrain.schedules.warmup_cosine cannot be called with these arguments: "
        "missing a required argument: 'warmup_steps'",
        "state.ema: TrainState.create takes no argument 'ema' (did you mean 'ema_decay'?)",
        "data.valid: expected one of train, eval, test",
        "callbacks.0._target_: expected an importable class or function, got "
        "'functrain.demo.NoSuchCallback'",
        "fit.eval_data: set by data.eval, not here",
        "fit.max_epoch: fit takes no argument 'max_epoch' (did you mean 'max_epochs'?)",
    ):
        assert expected in message, expected
    assert message.count("\n  - ") == 7  # every problem at once
    with pytest.raises(
        ft.ConfigError,
        match=r"loss: functrain.demo.loss_fn cannot be called .*missing a required argument: "
        r"'model'.*needs _partial_: true",
    ):
        ft.build_run({**good, "loss": {"_target_": "functrain.demo.loss_fn"}})
    # what a target raises when called (after every key was checked) is reported with its key
    with pytest.raises(
        ft.ConfigError,
        match=r"optimizer: functrain.adamw failed: ConfigError: .*weight_decay must be >= 0",
    ):
        ft.build_run({**good, "optimizer": {**good["optimizer"], "weight_decay": -1.0}})
    # an object that is not a callback, by its index, before anything trains
    with pytest.raises(ft.ConfigError, match=r"callbacks.0: OrderedDict is not a callback"):
        ft.build_run({**good, "callbacks": [{"_target_": "collections.OrderedDict"}]})
    # a target among another's positional arguments, by its index and its own target
    randn = {"_target_": "torch.randn", "_args_": [-1, 3]}
    with pytest.raises(
        ft.ConfigError,
        match=r"data.train._args_.0: torch.randn failed: RuntimeError: .*negative dimension",
    ):
        ft.build_run(
            {
                **good,
                "data": {
                    **good["data"],
                    "train": {"_target_": "torch.utils.data.TensorDataset", "_args_": [randn]},
                },
            }
        )
    # fit's own checks, before any training, keyed by the argument
    with pytest.raises(
        ft.ConfigError,
        match=r"(?s)fit.batch_size: batch_size must be an int >= 1 or None, got "
        r"batch_size=0.*fit.on_config_change: on_config_change must be",
    ):
        ft.build_run(
            {**good, "fit": {**good["fit"], "batch_size": 0, "on_config_change": "ignore"}}
        )
    with pytest.raises(ft.ConfigError, match="optimizer: expected a functrain optimizer"):
        ft.build_run({**good, "optimizer": {"_target_": "torch.nn.Identity"}})


def test_bad_overrides_and_interpolations_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ft.ConfigError, match=r"fit has no key 'max_step' \(did you mean 'max_steps'\?\)"
    ):
        ft.load_config(DEMO, ["fit.max_step=3"])
    with pytest.raises(ft.ConfigError, match=r"Could not override 'fit.save_every'.*\+fit.save"):
        ft.load_config(DEMO, ["fit.save_every=3"])
    with pytest.raises(
        ft.ConfigError, match="config key optimizer.lr.peak_value: cannot resolve its value: .*'lr'"
    ):
        ft.load_config(DEMO, ["~lr"])
    with pytest.raises(
        ft.ConfigError, match=r"expected a .yaml config file, got .*nope.yaml' \(no such file\)"
    ):
        ft.load_config(tmp_path / "nope.yaml")
    assert ft.load_config(DEMO, ["+fit.save_every=7", "~callbacks"])["fit"]["save_every"] == 7


def test_schedules_optimizers_callbacks_and_torch_class_paths_instantiate(tmp_path: Path) -> None:
    from torch.optim.lr_scheduler import LinearLR, SequentialLR, StepLR

    config = ft.load_config(DEMO, [f"out={tmp_path}"])
    config["optimizer"] = {
        "_target_": "functrain.sgd",
        "momentum": 0.9,
        "lr": {
            "_target_": "functrain.schedules.from_torch",
            "_args_": ["torch.optim.lr_scheduler.SequentialLR"],
            "lr": 0.1,
            "milestones": [3],
            "schedulers": [
                ["torch.optim.lr_scheduler.LinearLR", {"start_factor": 0.1, "total_iters": 3}],
                ["StepLR", {"step_size": 2}],
            ],
        },
    }
    config["callbacks"] = [
        {"_target_": "functrain.LRMonitor"},
        {"_target_": "functrain.JsonlLogger", "path": str(tmp_path / "log.jsonl")},
    ]
    run = ft.build_run(config)
    members = [(LinearLR, {"start_factor": 0.1, "total_iters": 3}), (StepLR, {"step_size": 2})]
    expected = ft.sgd(
        ft.schedules.from_torch(SequentialLR, lr=0.1, milestones=[3], schedulers=members),
        momentum=0.9,
    )
    assert run.state.optimizer.name == expected.name
    assert [type(c) for c in run.fit_kwargs["callbacks"]] == [ft.LRMonitor, ft.JsonlLogger]
    assert run.fit_kwargs["early_stopping"] == ft.EarlyStopping(
        "val_loss", patience=4, min_delta=1e-4
    )


def test_the_functrain_command_runs_in_a_process_of_its_own(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"functrain": "functrain.config.cli:main"}
    # `python -m functrain` is runpy running functrain.__main__: here after a look at what `import
    # functrain` loaded
    args = [
        "functrain",
        "run",
        "configs/demo.yaml",
        "--print-config",
        "epochs=3",
        "+fit.save_every=5",
        "~callbacks",
    ]
    code = (
        "import runpy, sys, functrain; print('light:', 'hydra' not in sys.modules); "
        f"sys.argv = {args!r}; runpy.run_module('functrain', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("light: True\n")  # import functrain never imports Hydra
    assert (
        "decay_steps: 60\n" in done.stdout
        and "save_every: 5\n" in done.stdout
        and "callbacks" not in done.stdout
    )


def test_defaults_lists_and_config_groups_compose_as_in_hydra(tmp_path: Path) -> None:
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "sgd.yaml").write_text(
        "_target_: functrain.sgd\nlr: ${lr}\nmomentum: 0.9\n"
    )
    (tmp_path / "optimizer" / "adamw.yaml").write_text("_target_: functrain.adamw\nlr: ${lr}\n")
    (tmp_path / "run.yaml").write_text("defaults:\n  - optimizer: sgd\n  - _self_\nlr: 0.1\n")
    assert ft.load_config(tmp_path / "run.yaml")["optimizer"] == {
        "_target_": "functrain.sgd",
        "lr": 0.1,
        "momentum": 0.9,
    }
    assert ft.load_config(tmp_path / "run.yaml", ["optimizer=adamw", "lr=0.01"])["optimizer"] == {
        "_target_": "functrain.adamw",
        "lr": 0.01,
    }
    with pytest.raises(ft.ConfigError, match="Could not find 'optimizer/lion'"):
        ft.load_config(tmp_path / "run.yaml", ["optimizer=lion"])


def test_a_hydra_apps_own_dictconfig_builds_and_is_saved_resolved(tmp_path: Path) -> None:
    from omegaconf import OmegaConf  # what a @hydra.main function is given

    config = ft.load_config(DEMO, short(tmp_path))
    cfg = OmegaConf.create(
        {
            **config,
            "lr": 0.002,
            "optimizer": {
                **config["optimizer"],
                "lr": {**config["optimizer"]["lr"], "peak_value": "${lr}"},
            },
        }
    )
    result = ft.build_run(cfg).fit()
    saved = read_manifest(result.checkpoints["latest"])["metadata"]["config"]
    assert saved["optimizer"]["lr"]["peak_value"] == 0.002 and saved["model"]["width"] == 4


def test_a_resume_that_falls_back_to_an_older_checkpoint_compares_that_ones_config(
    tmp_path: Path,
) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 10, (16,)))

    def run(config: dict, steps: int) -> ft.FitResult:
        state = ft.TrainState.create(torch.nn.Linear(3, 10), ft.sgd(0.1), demo.loss_fn)
        return ft.fit(
            state,
            data,
            batch_size=8,
            max_steps=steps,
            save_every=1,
            progress=False,
            verbosity="silent",
            checkpoint_dir=tmp_path,
            resume=True,
            config=config,
        )

    run({"tag": "a"}, 2)
    latest = ft.CheckpointManager(tmp_path, readonly=True).latest()
    (latest / "manifest.json").write_bytes(
        b"{}"
    )  # the newest checkpoint is damaged: the one before it is restored
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {latest.name}"):
        with pytest.raises(ft.ConfigError, match="tag: 'a' -> 'b'"):
            run({"tag": "b"}, 3)


class SamplesSeen:
    """A metric over a whole evaluation set (`functrain.EvalMetric`): the samples it saw."""

    def reset(self) -> None:
        self.count = 0

    def update(self, labels: torch.Tensor) -> None:
        self.count += len(labels)

    def compute(self) -> float:
        return float(self.count)


def eval_with_metrics(model: torch.nn.Module, batch: tuple, metrics: dict) -> torch.Tensor:
    """An eval_fn a config names: it is given the metric objects the config builds."""
    x, y = batch
    metrics["seen"].update(y)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_a_configs_eval_fn_updates_the_metric_objects_the_config_builds() -> None:
    def tensors(n: int) -> dict:
        return {
            "_target_": "torch.utils.data.TensorDataset",
            "_args_": [
                {"_target_": "torch.randn", "_args_": [n, 3]},
                {"_target_": "torch.randint", "_args_": [0, 4, [n]]},
            ],
        }

    config = {
        "model": {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 4},
        "loss": {"_target_": "functrain.demo.loss_fn", "_partial_": True},
        "optimizer": {"_target_": "functrain.sgd", "lr": 0.1},
        "data": {"train": tensors(16), "eval": tensors(12)},
        "fit": {
            "max_epochs": 2,
            "batch_size": 5,
            "progress": False,
            "verbosity": "silent",
            "eval_fn": {
                "_target_": "tests.config.test_config.eval_with_metrics",
                "_partial_": True,
            },
            "eval_metrics": {"seen": {"_target_": "tests.config.test_config.SamplesSeen"}},
            "best_metric": "val_seen",
            "mode": "max",
        },
    }
    result = ft.build_run(config).fit()
    assert result.history.column("val_seen", "eval") == [12.0, 12.0]
