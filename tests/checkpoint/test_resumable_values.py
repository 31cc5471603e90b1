"""What a loaded state's counters, RNG and driver records may hold; `save` refuses the rest.

A checksum is not a signature: every crafted checkpoint here is written by the format's own code
(`format.write_tree`, which seals the manifest over the files' digests), so only the values are
judged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.checkpoint import format as fmt
from functrain.checkpoint import state_io
from functrain.errors import CheckpointCorruptError, ConfigError
from tests.models import loss_fn


def trained(steps: int = 2, **options: Any) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = ft.TrainState.create(nn.Linear(3, 2), ft.adam(0.1), loss_fn, **options)
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        state, _ = ft.train_step(state, (torch.randn(4, 3, generator=gen), torch.randn(4, 2)))
    return state


def crafted(path: Path, changes: dict[str, Any]) -> Path:
    """The checkpoint at `path` with the leaves at `changes`' paths replaced, sealed anew."""
    tree, manifest = ft.load(path)

    def edit(node: Any, where: str) -> Any:
        if where in changes:
            return changes[where]
        if isinstance(node, dict):
            return {k: edit(v, f"{where}/{k}" if where else k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(edit(v, f"{where}/{i}") for i, v in enumerate(node))
        return node

    out = path.with_name(path.name + "-crafted")
    fmt.write_tree(
        out, edit(tree, ""), fingerprint=manifest["fingerprint"], metadata=manifest["metadata"]
    )
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ft.TrainState, Path]:
    state = trained()
    return state, ft.save(state, tmp_path_factory.mktemp("saved") / "c")


def random_bytes(n: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"epoch_step": torch.tensor(-1)}, "epoch_step: expected an int >= 0, got -1"),
        ({"step": torch.tensor(-100)}, "step: expected an int >= 0, got -100"),
        ({"samples_seen": torch.tensor(-8)}, "samples_seen: expected an int >= 0, got -8"),
        (
            {"micro_step": torch.tensor(7)},
            "micro_step: expected an int below accumulate_steps=1",
        ),
        (
            {"skipped": torch.tensor(3)},
            r"skipped: expected at most step \(2: skipped updates are counted",
        ),
        (
            {"opt_state/inner/count": torch.tensor(-1)},
            "opt_state/inner/count: expected an int >= 0, got -1",
        ),
        (
            {"opt_state/inner/count": torch.tensor(5)},
            r"opt_state/inner/count: expected at most step \(2\), got 5",
        ),
        (
            {"opt_state/total_skipped": torch.tensor(-2)},
            "opt_state/total_skipped: expected an int >= 0, got -2",
        ),
        (
            {"opt_state/consecutive": torch.tensor(1)},
            r"opt_state/consecutive: expected at most opt_state/total_skipped \(0\), got 1",
        ),
        (
            {"opt_state/max_consecutive": torch.tensor(5)},
            "opt_state/max_consecutive: expected the transform's configured -1, got 5",
        ),
        (
            {"ema_state/count": torch.tensor(-3)},
            "ema_state/count: expected an int >= 0, got -3",
        ),
        (
            {"rng": random_bytes(5056)},
            "rng: expected a generator state that torch accepts on cpu, got 5056 bytes it "
            r"refuses \(Invalid mt19937 state\)",
        ),
    ],
    ids=[
        "epoch-step-negative",
        "step-negative",
        "samples-negative",
        "micro-step-past-window",
        "skipped-above-step",
        "adam-count-negative",
        "adam-count-above-step",
        "skips-negative",
        "consecutive-above-total",
        "skip-limit-changed",
        "ema-count-negative",
        "rng-random-bytes",
    ],
)
def test_counters_and_rng_a_run_cannot_resume_from_are_corrupt_naming_path_and_value(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    state = trained(ema_decay=0.9)
    path = crafted(ft.save(state, tmp_path / "c"), changes)
    with pytest.raises(CheckpointCorruptError, match=f"(?s)cannot resume from:.*{expected}"):
        ft.load(path, like=state)
    # the raw tree still loads, for inspection
    assert ft.load(path)[1]["fingerprint"] == ft.fingerprint(state)


def test_an_adam_count_below_zero_would_resume_into_nan_weights(
    saved: tuple[ft.TrainState, Path],
) -> None:
    state, path = saved
    adam = state.opt_state.inner
    resumed = state.replace(
        opt_state=state.opt_state._replace(inner=adam._replace(count=torch.tensor(-1)))
    )  # what the load gave before it checked the count
    stepped, _ = ft.train_step(resumed, (torch.ones(4, 3), torch.ones(4, 2)))
    assert torch.isnan(stepped.params["weight"]).all()  # why the load refuses it
    with pytest.raises(CheckpointCorruptError, match="opt_state/inner/count"):
        ft.load(crafted(path, {"opt_state/inner/count": torch.tensor(-1)}), like=state)


def test_every_problem_is_listed_in_one_error(saved: tuple[ft.TrainState, Path]) -> None:
    state, path = saved
    bad = crafted(
        path,
        {
            "step": torch.tensor(-100),
            "micro_step": torch.tensor(7),
            "rng": random_bytes(5056),
            "driver": {"empty_batches": -1},
        },
    )
    with pytest.raises(CheckpointCorruptError) as raised:
        ft.load(bad, like=state)
    message = str(raised.value)
    for expected in (
        "step: expected an int >= 0, got -100",
        "micro_step: expected an int below accumulate_steps=1",
        "rng: expected a generator state",
        "holds driver records (state.driver) that fit cannot resume from",
        "driver/empty_batches: expected an int >= 0",
    ):
        assert expected in message


def test_the_accumulation_window_counts_with_the_state(tmp_path: Path) -> None:
    state = trained(steps=3, accumulate_steps=2)
    assert (int(state.micro_step), int(state.opt_state.micro_step)) == (1, 1)
    path = ft.save(state, tmp_path / "c")
    for changes, expected in [
        ({"micro_step": torch.tensor(2)}, "micro_step: expected an int below accumulate_steps=2"),
        (
            {"opt_state/micro_step": torch.tensor(0)},
            r"opt_state/micro_step: expected the state's micro_step \(1: both count",
        ),
    ]:
        with pytest.raises(CheckpointCorruptError, match=expected):
            ft.load(crafted(path, changes), like=state)
    restored = ft.load(path, like=state)
    assert (int(restored.micro_step), int(restored.step)) == (1, 1)


def test_a_position_past_the_end_of_the_recorded_epoch_is_corrupt(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), loss_fn)
    data = TensorDataset(torch.randn(10, 3), torch.randn(10, 2))
    result = ft.fit(
        state, data, batch_size=4, max_steps=2, checkpoint_dir=tmp_path / "run", progress=False,
        verbosity="silent",
    )  # fmt: skip
    assert result.state.driver["data"]["samples"] == 10  # 3 batches an epoch
    path = ft.CheckpointManager(tmp_path / "run", readonly=True).latest()
    assert path is not None
    assert int(ft.load(path, like=state).epoch_step) == 2
    for position in (3, 0):  # the end of the epoch, its start
        ft.load(crafted(path, {"epoch_step": torch.tensor(position)}), like=state)
    bad = crafted(path, {"epoch_step": torch.tensor(10**12)})
    with pytest.raises(
        CheckpointCorruptError,
        match=re.escape("epoch_step: expected at most 3 (the batches of an epoch of the data "),
    ):
        ft.load(bad, like=state)


def test_one_tensor_named_from_two_paths_is_corrupt(tmp_path: Path) -> None:
    path = fmt.write_tree(tmp_path / "c", {"mu": torch.ones(3), "nu": 2})
    manifest = json.loads((path / fmt.MANIFEST).read_bytes())
    del manifest["manifest_blake3"]
    manifest["structure"]["dict"]["nu"] = {"tensor": "mu"}  # the two would share one storage
    (path / fmt.MANIFEST).unlink()
    fmt.write_manifest(path, manifest)  # sealed anew
    with pytest.raises(
        CheckpointCorruptError, match="tensor 'mu' is named at 'mu' and again at 'nu'"
    ):
        ft.load(path)


@pytest.mark.parametrize(
    "state_at",
    [
        lambda: trained(steps=4, accumulate_steps=3, ema_decay=0.5),
        lambda: trained(steps=3, precision="fp16", max_consecutive_nonfinite=9),
        lambda: trained(steps=3, nonfinite="halt", clip_grad_norm=1.0),
        lambda: ft.stack([trained(steps=1, accumulate_steps=2) for _ in range(3)]),
    ],
    ids=["accumulate-ema", "fp16", "halt-clip", "stacked"],
)
def test_states_the_steps_leave_save_and_load(tmp_path: Path, state_at: Any) -> None:
    state = state_at()
    restored = ft.load(ft.save(state, tmp_path / "c"), like=state)
    assert torch.equal(restored.step, state.step) and torch.equal(restored.rng, state.rng)


# ---------------------------------------------------------------- what save accepts, load reads


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"step": torch.tensor(-1)}, "step: expected an int >= 0, got -1"),
        ({"epoch": 3.0}, "epoch: expected an int64 tensor, got float 3.0"),
        ({"micro_step": torch.tensor(1)}, "micro_step: expected an int below accumulate_steps=1"),
        ({"rng": torch.zeros(5056, dtype=torch.uint8)}, "rng: expected a generator state"),
    ],
    ids=["negative", "not-a-tensor", "past-window", "rng"],
)
def test_save_refuses_before_writing_a_state_a_load_would_refuse(
    tmp_path: Path, saved: tuple[ft.TrainState, Path], changes: dict[str, Any], expected: str
) -> None:
    # (put in the saved tree as a checkpoint of another program could hold it: `replace` refuses
    # a counter that is no count before any save)
    state = saved[0].with_tree({**saved[0].tree(), **changes})
    with pytest.raises(ConfigError, match=f"(?s)cannot save this state: .*{re.escape(expected)}"):
        ft.save(state, tmp_path / "c")
    with ft.CheckpointManager(tmp_path / "managed") as manager:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            manager.save(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["managed"]
    assert [p.name for p in (tmp_path / "managed").iterdir()] == ["writer.lock"]


def test_a_user_key_in_driver_is_refused_where_it_is_put(saved: tuple[ft.TrainState, Path]) -> None:
    state = saved[0]
    with pytest.raises(
        ConfigError, match=r"got the keys \['task'\]: keep your own state in state.user"
    ):
        state.replace(driver={"task": "digits"})
    with pytest.raises(ConfigError, match="state.user"):
        state.replace(driver={**state.driver, "history": None, "task": 1})
    state.replace(driver={"best": None, "empty_batches": 0})  # the driver's own keys


def test_a_user_key_slipped_into_driver_is_refused_by_save_before_writing(
    tmp_path: Path, saved: tuple[ft.TrainState, Path]
) -> None:
    state = saved[0].replace(driver={})
    # past the check on construction and the mapping's refusal: dict's own assignment
    dict.__setitem__(state.driver, "task", "digits")
    with pytest.raises(ConfigError, match=r"driver: unknown keys \['task'\]"):
        ft.save(state, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_user_data_in_state_user_saves_and_loads(
    tmp_path: Path, saved: tuple[ft.TrainState, Path]
) -> None:
    state = saved[0].replace(user={"task": "digits", "seen": torch.arange(3)})
    restored = ft.load(ft.save(state, tmp_path / "c"), like=saved[0])
    assert restored.user["task"] == "digits" and torch.equal(restored.user["seen"], torch.arange(3))


def test_the_driver_registers_its_checks_and_keys_on_import() -> None:
    from functrain.core import state as core_state
    from functrain.driver.ledger import position_problems, tree_problems

    assert state_io._driver_checks == [tree_problems]
    assert state_io._state_checks == [position_problems]
    assert {"history", "source", "data"} <= core_state._DRIVER_KEYS


def _formula_state(optimizer: ft.Transform, **options: Any) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = ft.TrainState.create(nn.Linear(3, 2), optimizer, loss_fn, **options)
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        state, _ = ft.train_step(state, (torch.randn(4, 3, generator=gen), torch.randn(4, 2)))
    return state


@pytest.mark.parametrize(
    ("optimizer", "changes", "expected"),
    [
        # 1 - 1 / beta1 places the evaluation point: 0 divided by zero in predict
        (
            "schedule-free",
            {"opt_state/inner/group/beta1": torch.tensor(0.0, dtype=torch.float64)},
            r"opt_state/inner/group/beta1: expected the optimizer's own 0.9, got 0.0",
        ),
        (
            "schedule-free",
            {"opt_state/inner/group/k": torch.tensor(-3.0, dtype=torch.float64)},
            r"opt_state/inner/group/k: expected a whole number >= 0, got -3.0",
        ),
        (
            "schedule-free",
            {"opt_state/inner/group/k": torch.tensor(7.0, dtype=torch.float64)},
            r"opt_state/inner/group/k: expected at most count \(3\), got 7.0",
        ),
        (
            "schedule-free",
            {"opt_state/inner/group/weight_sum": torch.tensor(float("nan"), dtype=torch.float64)},
            r"opt_state/inner/group/weight_sum: expected a finite number, got nan",
        ),
        (
            "nadam",
            {"opt_state/inner/slots/step/1": torch.tensor(2.5)},
            r"opt_state/inner/slots/step/1: expected a whole number >= 0, got 2.5",
        ),
        (
            "nadam",
            {"opt_state/inner/slots/step/0": torch.tensor(9.0)},
            r"opt_state/inner/slots/step/0: expected at most group/steps_at \(0.0\), got 9.0",
        ),
        (
            "nadam",
            {"opt_state/inner/hyperparameters/lr": torch.tensor(5.0, dtype=torch.float64)},
            r"opt_state/inner/hyperparameters/lr: expected the optimizer's own 0.1, got 5.0",
        ),
    ],
    ids=[
        "beta1-zero",
        "k-negative",
        "k-above-count",
        "weight-sum-nan",
        "step-fraction",
        "step-above",
        "lr-changed",
    ],
)
def test_a_formulas_own_numbers_a_run_cannot_resume_from_are_corrupt(
    tmp_path: Path, optimizer: str, changes: dict[str, Any], expected: str
) -> None:
    make = {"schedule-free": lambda: ft.adamw_schedule_free(0.1), "nadam": lambda: ft.nadam(0.1)}
    state = _formula_state(make[optimizer]())
    path = ft.save(state, tmp_path / "c")
    assert ft.diff_states(ft.load(path, like=state), state) == []  # as saved: it loads
    with pytest.raises(CheckpointCorruptError, match=f"(?s)cannot resume from:.*{expected}"):
        ft.load(crafted(path, changes), like=state)


def test_a_differentiable_states_hyperparameters_load_as_its_user_set_them(
    tmp_path: Path,
) -> None:
    state = _formula_state(ft.adam(0.1), differentiable=True)
    changed = ft.save(state.with_hyperparameters(lr=0.05), tmp_path / "c")
    assert float(ft.load(changed, like=state).hyperparameters["lr"]) == 0.05
    with pytest.raises(CheckpointCorruptError, match=r"hyperparameters/lr: expected a finite"):
        ft.load(
            crafted(
                changed,
                {
                    "opt_state/inner/hyperparameters/lr": torch.tensor(
                        float("inf"), dtype=torch.float64
                    )
                },
            ),
            like=state,
        )
