"""Values a config gives that functrain cannot use: each a ConfigError naming its config key,
collected together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hydra")

import functrain as ft  # noqa: E402
from tests.config.test_targets import run_config  # noqa: E402


def problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ft.ConfigError) as info:
        ft.build_run(config)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid run config:"
    return [line.removeprefix("  - ") for line in lines[1:]]


def test_a_seed_beyond_torchs_range_names_the_key() -> None:
    assert problems(run_config(seed=10**25)) == [
        "seed: expected an int in [-2**63, 2**64) (torch.manual_seed's range; or null: no "
        "seeding), got int 10000000000000000000000000"
    ]


def test_fit_values_are_refused_together_by_their_keys(tmp_path: Path) -> None:
    checkpoint = ft.save(ft.build_run(run_config()).state, tmp_path / "ckpt-000000000-000000000")
    fit = {
        **run_config()["fit"],
        "batch_size": 10**20,
        "checkpoint_dir": str(checkpoint / "nested"),
        "log_file": 5,
        "eval_fn": 5,
        "device": "gpu7",
    }
    found = problems(run_config(fit=fit))
    assert [p.split(":")[0] for p in found] == [
        "fit.eval_fn",
        "fit.batch_size",
        "fit.checkpoint_dir",
        "fit.log_file",
        "fit.device",
        "fit.eval_fn",
    ]
    assert found[2].startswith(
        f"fit.checkpoint_dir: checkpoint_dir='{checkpoint}/nested' is inside"
    )
    empty = problems(run_config(fit={**run_config()["fit"], "checkpoint_dir": "", "keep_last": 2}))
    assert empty == [
        "fit.checkpoint_dir: checkpoint_dir must be a path (a str or pathlib.Path) or None, got "
        "checkpoint_dir='' (an empty path): give a path, or None for no checkpoints"
    ]


def test_a_target_under_a_misspelt_section_is_reported_with_the_section_meant() -> None:
    config = run_config(optimiser={"_target_": "functrain.adamw", "lr": 0.1})
    del config["optimizer"]
    assert problems(config) == [
        "optimizer: expected a mapping with a _target_ (the functrain optimizer), got nothing",
        "optimiser: a run has no section 'optimiser' (did you mean 'optimizer'?), and nothing "
        "builds the _target_ 'functrain.adamw'; the sections are seed, model, loss, optimizer, "
        "state, data, callbacks, fit, and a top-level key of your own holds values that they "
        "interpolate",
    ]


def test_a_misspelt_section_without_a_target_is_refused_not_ignored() -> None:
    config = run_config(sate={"clip_grad_norm": 1.0, "ema_decay": 0.99}, stats={"mean": 0.5})
    assert "state" not in config
    assert problems(config) == [
        "sate: a run has no section 'sate' (did you mean 'state'?), and the config has no "
        "state: its keys (clip_grad_norm, ema_decay) would be read by nothing; name it state, or "
        "give a mapping of your own a name further from the sections'"
    ]
    ft.build_run(run_config(state={"clip_grad_norm": 1.0}, stats={"mean": 0.5}))  # spelt right


def test_a_target_under_a_key_of_your_own_is_reported_with_the_other_problems() -> None:
    schedule = {"_target_": "functrain.schedules.cosine_decay", "init_value": 0.1, "decay_steps": 4}
    config = run_config(lr=0.1, extras={"schedules": [schedule]}, seed="zero")
    assert problems(config) == [
        "seed: expected an int in [-2**63, 2**64) (torch.manual_seed's range; or null: no "
        "seeding), got str 'zero'",
        "extras: a run has no section 'extras', and nothing builds the _target_ "
        "'functrain.schedules.cosine_decay' at extras.schedules.0; the sections are seed, model, "
        "loss, optimizer, state, data, callbacks, fit, and a top-level key of your own holds "
        "values that they interpolate",
    ]


def test_a_target_of_your_own_that_a_section_interpolates_is_built_there(tmp_path: Path) -> None:
    import yaml

    schedule = {"_target_": "functrain.schedules.cosine_decay", "init_value": 0.1, "decay_steps": 4}
    config = run_config(
        schedule=schedule, optimizer={"_target_": "functrain.sgd", "lr": "${schedule}"}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = ft.build_run(ft.load_config(path))
    assert int(run.fit().state.step) == 1


def test_a_states_count_of_samples_is_a_function_the_config_names_uncalled() -> None:
    # (a batch (x, y) of 4 rows: the function counts its 2 tensors, the default its 4 rows)
    counted = {"samples": {"_target_": "builtins.len", "_partial_": True}}
    assert int(ft.build_run(run_config(state=counted)).fit().state.samples_seen) == 2
    assert int(ft.build_run(run_config()).fit().state.samples_seen) == 4
