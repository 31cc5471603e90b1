"""`WandbLogger` in W&B's offline mode: what it logged, read back from the run's own `.wandb`
file."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.distributed import DistConfig
from tests.models import loss_fn

wandb = pytest.importorskip("wandb")  # the `wandb` extra, which `make test` installs
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

SILENT = wandb.Settings(silent=True)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The history rows, config, summary and exit code of the one finished offline run under
    `run_dir`.

    ``run.finish()`` returns before W&B's service has written the run's file to its end: wait for
    the exit record (the file read while a chunk is half written stops before that chunk).
    """
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while (out := parse(path.read_bytes()))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out["exit_code"] is not None, f"{path} has no exit record after 60 s"
    return out


def parse(data: bytes) -> dict[str, Any]:
    """The records of a `.wandb` file: a 7-byte header, then a LevelDB log of 32 KiB blocks of
    chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf
    `Record`."""
    assert data[:4] == b":W&B"
    out: dict[str, Any] = {
        "history": [],
        "config": {},
        "summary": {},
        "exit_code": None,
        "artifacts": [],
    }
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk W&B's service is still writing: read later
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            _collect(record, out)
    return out


def _collect(record: Any, out: dict[str, Any]) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "history":
        row = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        out["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
    elif kind in ("run", "config"):
        items = record.run.config.update if kind == "run" else record.config.update
        out["config"].update(
            {
                item.key: json.loads(item.value_json)
                for item in items
                if not item.key.startswith("_")
            }
        )
    elif kind == "summary":
        out["summary"].update(
            {item.key: json.loads(item.value_json) for item in record.summary.update}
        )
    elif kind == "exit":
        out["exit_code"] = record.exit.exit_code
    elif kind == "artifact":
        a = record.artifact
        out["artifacts"].append(
            {
                "name": a.name,
                "type": a.type,
                "aliases": list(a.aliases),
                "refs": sorted(e.ref for e in a.manifest.contents),
            }
        )


def setup() -> tuple[ft.TrainState, TensorDataset]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    return ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), loss_fn), data


def fit(
    state: ft.TrainState, data: Any, tmp_path: Path, callbacks: list[Any], **kwargs: Any
) -> ft.FitResult:
    options = dict(
        eval_data=data,
        batch_size=16,
        max_epochs=2,
        log_every=3,
        progress=False,
        verbosity="silent",
        checkpoint_dir=tmp_path / "ckpt",
    )
    return ft.fit(state, data, callbacks=callbacks, **{**options, **kwargs})


def rows_of(history: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The logged rows of one kind, as history rows again (``train/loss`` -> ``loss``)."""
    picked = [r for r in history if any(k.startswith(prefix + "/") for k in r)]
    return [
        {
            "step": r["trainer/step"],
            "epoch": r["trainer/epoch"],
            **{k[len(prefix) + 1 :]: v for k, v in r.items() if k.startswith(prefix + "/")},
        }
        for r in picked
    ]


def numbers(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_logs_every_train_eval_and_epoch_row_with_its_step_config_and_checkpoints(
    tmp_path: Path,
) -> None:
    state, data = setup()
    logger = ft.WandbLogger(
        config={"lr": 1e-2, "model": "linear"},
        project="functrain-test",
        mode="offline",
        dir=str(tmp_path),
        settings=SILENT,
    )
    result = fit(state, data, tmp_path, [logger])
    logged = read_run(tmp_path)
    # 2 epochs of 4 updates, a log every 3: train rows at 3, 6 and the partial one at 8
    assert [r["step"] for r in result.history.rows["train"]] == [3, 6, 8]
    for kind in ("train", "eval", "epoch"):
        assert rows_of(logged["history"], kind) == [
            numbers(row) for row in result.history.rows[kind]
        ], kind
    assert logger.logged == {"train": 3, "eval": 2, "epoch": 2}
    config = logged["config"]
    assert (config["lr"], config["model"]) == (1e-2, "linear")
    assert {
        "max_epochs": 2,
        "log_every": 3,
        "best_metric": "val_loss",
        "batch_size": 16,
        "data_seed": 0,
        "keep_best": 1,
    }.items() <= config["fit"].items()
    assert config["fit"]["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert config["optimizer"] == state.optimizer.name and config["trainable_parameters"] == 4
    saved = [str(Path(p).resolve()) for p in result.checkpoints["all"]]
    assert len(saved) == 2
    assert [r["checkpoint/path"] for r in logged["history"] if "checkpoint/path" in r] == saved
    assert [r["trainer/step"] for r in logged["history"] if "checkpoint/path" in r] == [4, 8]
    assert (
        logged["summary"]["checkpoint/latest"] == saved[-1]
        and logged["summary"]["checkpoint/all"] == saved
    )
    assert logged["exit_code"] == 0 and logger.run is None and wandb.run is None  # finished


def test_fits_config_is_the_runs_config_and_the_loggers_own_keys_win(tmp_path: Path) -> None:
    state, data = setup()
    logger = ft.WandbLogger(
        config={"lr": 0.5},
        project="functrain-test",
        mode="offline",
        dir=str(tmp_path),
        settings=SILENT,
    )
    fit(state, data, tmp_path, [logger], max_epochs=1, config={"lr": 1e-2, "model": {"width": 3}})
    config = read_run(tmp_path)["config"]
    assert (
        config["model"] == {"width": 3} and config["lr"] == 0.5
    )  # fit's config=, then the logger's own
    assert (
        "config" not in config["fit"]
    )  # logged as the config itself, not as a string among fit's settings


def test_checkpoints_become_versions_of_a_model_artifact_by_reference(tmp_path: Path) -> None:
    state, data = setup()
    logger = ft.WandbLogger(
        checkpoint_artifacts=True, mode="offline", dir=str(tmp_path), settings=SILENT
    )
    result = fit(state, data, tmp_path, [logger])
    logged = read_run(tmp_path)
    saved = [Path(p).resolve() for p in result.checkpoints["all"]]
    assert [(a["type"], sorted(a["aliases"])) for a in logged["artifacts"]] == [
        ("model", ["latest", "step-4"]),
        ("model", ["latest", "step-8"]),
    ]
    assert {a["name"] for a in logged["artifacts"]} == {
        f"checkpoints-{Path(next(tmp_path.glob('wandb/offline-run-*'))).name.split('-')[-1]}"
    }
    for artifact, path in zip(logged["artifacts"], saved):
        assert artifact["refs"] == sorted(f.as_uri() for f in path.iterdir() if f.is_file())


def test_an_exception_logs_the_rows_before_it_and_finishes_the_run_as_failed(
    tmp_path: Path,
) -> None:
    state, data = setup()
    logger = ft.WandbLogger(mode="offline", dir=str(tmp_path), settings=SILENT)

    @ft.on("batch_end")
    def crash(run: ft.Run) -> None:
        if run.step == 7:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fit(state, data, tmp_path, [logger, crash], log_every=2)
    logged = read_run(tmp_path)
    assert [r["step"] for r in rows_of(logged["history"], "train")] == [2, 4, 6]
    assert [r["step"] for r in rows_of(logged["history"], "eval")] == [4]
    assert logged["exit_code"] == 1 and wandb.run is None


def test_a_run_given_by_the_user_gets_the_rows_and_config_and_stays_open(tmp_path: Path) -> None:
    state, data = setup()
    own = wandb.init(
        project="functrain-test",
        config={"seed": 3},
        mode="offline",
        dir=str(tmp_path),
        settings=SILENT,
    )
    try:
        logger = ft.WandbLogger(run=own, config={"lr": 1e-2})
        result = fit(state, data, tmp_path, [logger], max_epochs=1)
        assert logger.run is own and wandb.run is own  # not finished: the user owns it
        own.log({"after_fit": 1.0})
    finally:
        own.finish()
    logged = read_run(tmp_path)
    assert {"seed": 3, "lr": 1e-2}.items() <= logged["config"].items()
    assert logged["config"]["fit"]["max_epochs"] == 1
    assert rows_of(logged["history"], "eval") == [numbers(r) for r in result.history.rows["eval"]]
    assert logged["history"][-1] == {"after_fit": 1.0}  # the user's own metrics keep their own axis


def test_a_resumed_run_logs_only_the_rows_after_its_checkpoint(tmp_path: Path) -> None:
    state, data = setup()
    fit(state, data, tmp_path, [], max_epochs=1)
    logger = ft.WandbLogger(mode="offline", dir=str(tmp_path), settings=SILENT)
    result = fit(state, data, tmp_path, [logger], resume=True)
    assert [r["epoch"] for r in result.history.rows["epoch"]] == [0, 1]
    logged = read_run(tmp_path)
    assert [r["epoch"] for r in rows_of(logged["history"], "epoch")] == [1]
    assert [r["step"] for r in rows_of(logged["history"], "eval")] == [8]


def test_ranks_other_than_0_start_and_log_nothing(tmp_path: Path) -> None:
    state, _ = setup()
    logger = ft.WandbLogger(mode="offline", dir=str(tmp_path), settings=SILENT)
    rank1 = SimpleNamespace(
        state=state.with_statics(dist=DistConfig(world_size=2, rank=1)),
        config={"run_mode": "epoch"},
        history=ft.History(),
        logs={"loss": 1.0},
        saved=tmp_path,
        step=1,
        epoch=0,
    )
    for hook in (
        "on_train_begin",
        "on_batch_end",
        "on_eval_end",
        "on_save",
        "on_epoch_end",
        "on_train_end",
        "on_exception",
    ):
        getattr(logger, hook)(rank1)
    assert logger.run is None and wandb.run is None and not (tmp_path / "wandb").exists()
    assert logger.logged == {"train": 0, "eval": 0, "epoch": 0} and logger.checkpoints == []


def test_a_run_together_with_init_arguments_is_a_config_error() -> None:
    with pytest.raises(
        ft.ConfigError, match=r"an existing run and wandb.init arguments \['project'\]"
    ):
        ft.WandbLogger(run=object(), project="p")
    with pytest.raises(ft.ConfigError, match="config must be a mapping"):
        ft.WandbLogger(config=[("lr", 1)])  # type: ignore[arg-type]


def test_without_wandb_installed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an absent package looks like to import
    with pytest.raises(ft.ConfigError, match=r"pip install 'functrain\[wandb\]'"):
        ft.WandbLogger()
