"""CheckpointManager(best_per_member=True): each stacked member's best checkpoint, one per save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.models import loss_fn

MEMBERS = 3


def one_model() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Linear(3, 1)
    return ft.TrainState.create(module, ft.sgd(0.1), loss_fn)


def stacked_states(count: int) -> list[ft.TrainState]:
    """A stacked state of `MEMBERS` members after 1 .. `count` steps."""
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, generator=gen), torch.randn(4, 1, generator=gen))
    state, states = ft.stack([one_model()] * MEMBERS), []
    for _ in range(count):
        state, _ = ft.train_step(state, batch)
        states.append(state)
    return states


def metrics(mean: float, *columns: float) -> dict[str, float]:
    return {"val": mean, **{f"val[{k}]": v for k, v in enumerate(columns)}}


def steps(paths: list[Path | None]) -> list[int | None]:
    return [None if p is None else int(p.name.split("-")[1]) for p in paths]


def test_a_save_improving_several_members_is_kept_once(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True)
    mgr.save(stacked_states(1)[0], metrics(0.5, 0.4, 0.5, 0.6))
    assert steps(mgr.bests()) == [1]
    assert steps([mgr.best(member=k) for k in range(MEMBERS)]) == [1, 1, 1]


def test_each_member_keeps_its_best_and_a_best_no_ranking_needs_goes(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1, best_metric="val", best_per_member=True)
    for state, values in zip(
        stacked_states(4),
        [
            metrics(0.5, 0.4, 0.5, 0.6),  # every member's best, and the mean's
            metrics(0.45, 0.5, 0.3, 0.55),  # members 1 and 2, and the mean
            metrics(0.6, 0.6, 0.6, 0.6),  # nothing: not kept
            metrics(0.4, 0.5, 0.5, 0.2),  # member 2 and the mean: step 2 is member 1's alone
        ],
        strict=True,
    ):
        mgr.save(state, values)
    assert steps(mgr.bests()) == [1, 2, 4]
    assert steps([mgr.best(member=k) for k in range(MEMBERS)]) == [1, 2, 4]
    assert [mgr.best_value(member=k) for k in range(MEMBERS)] == [0.4, 0.3, 0.2]
    assert (steps([mgr.best()]), mgr.best_value()) == ([4], 0.4)


def test_an_equal_value_leaves_the_member_its_older_best(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True)
    first, second = stacked_states(2)
    mgr.save(first, metrics(0.5, 0.4, 0.5, 0.6))
    mgr.save(second, metrics(0.5, 0.4, 0.5, 0.6))
    assert steps(mgr.bests()) == [1]


def test_a_best_metric_naming_a_member_keeps_that_members_best_as_the_best(
    tmp_path: Path,
) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val[1]", best_per_member=True)
    for state, values in zip(
        stacked_states(2), [metrics(0.5, 0.4, 0.5, 0.6), metrics(0.4, 0.3, 0.6, 0.5)], strict=True
    ):
        mgr.save(state, values)
    assert steps([mgr.best(), mgr.best(member=0), mgr.best(member=1), mgr.best(member=2)]) == [
        1,
        2,
        1,
        2,
    ]


def test_keep_best_zero_keeps_the_members_bests_alone(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_best=0, best_metric="val", best_per_member=True)
    for state, values in zip(
        stacked_states(2), [metrics(0.5, 0.4, 0.5, 0.6), metrics(0.1, 0.5, 0.6, 0.7)], strict=True
    ):
        mgr.save(state, values)
    assert steps(mgr.bests()) == [1]


@pytest.mark.parametrize("async_save", [False, True])
def test_restore_best_gives_a_members_state_to_a_writer_and_a_reader(
    tmp_path: Path, async_save: bool
) -> None:
    states = stacked_states(2)
    writer = ft.CheckpointManager(
        tmp_path, best_metric="val", best_per_member=True, async_save=async_save
    )
    writer.save(states[0], metrics(0.5, 0.4, 0.5, 0.6))
    writer.save(states[1], metrics(0.4, 0.5, 0.3, 0.7))
    reader = ft.CheckpointManager(tmp_path, readonly=True, best_metric="val", best_per_member=True)
    for mgr in (writer, reader):
        for k, step in enumerate([0, 1, 0]):
            member = mgr.restore_best(states[0], member=k)
            assert member is not None
            assert_trees_equal(ft.unstack(states[step])[k].tree(), member.tree())
        whole = mgr.restore_best(states[0])
        assert whole is not None
        assert_trees_equal(states[1].tree(), whole.tree())
    writer.close()


def test_restore_best_without_a_best_gives_none(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True)
    assert mgr.restore_best(stacked_states(1)[0], member=0) is None
    assert mgr.best(member=0) is None


def test_one_models_state_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True)
    with pytest.raises(
        ConfigError,
        match=r"CheckpointManager\(best_per_member=True\) keeps the best checkpoint of each "
        r"member of a stacked state \(functrain.stack\), got one model's state \(its counters "
        r"are 0-d\): save it with a manager opened without best_per_member, or stack the members",
    ):
        mgr.save(one_model(), {"val": 0.5})
    assert (mgr.all(), mgr.bests()) == ([], [])


def test_best_per_member_needs_a_best_metric(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"best_per_member=True keeps each member's best by its column of best_metric: "
        r"pass best_metric=\.\.\. \(e\.g\. 'val_loss'\)",
    ):
        ft.CheckpointManager(tmp_path, best_per_member=True)


def test_a_members_best_is_refused_where_the_manager_does_not_keep_them(tmp_path: Path) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True) as mgr:
        mgr.save(stacked_states(1)[0], metrics(0.5, 0.4, 0.5, 0.6))
    reader = ft.CheckpointManager(tmp_path, readonly=True, best_metric="val")
    with pytest.raises(ConfigError, match=r"best\(member=1\) needs a CheckpointManager opened "):
        reader.best(member=1)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (3, r"member=3, but the best checkpoints of .* hold the columns of members 0 to 2 "),
        (-1, r"member must be a member's index \(an int >= 0\), got int -1"),
    ],
)
def test_a_member_the_run_did_not_have_is_refused(
    tmp_path: Path, member: int, message: str
) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True) as mgr:
        mgr.save(stacked_states(1)[0], metrics(0.5, 0.4, 0.5, 0.6))
        with pytest.raises(ConfigError, match=message):
            mgr.best(member=member)


def test_restore_best_of_a_member_needs_the_stacked_template(tmp_path: Path) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", best_per_member=True)
    with pytest.raises(
        ConfigError,
        match=r"restore_best\(member=0\) takes a member of the stacked state given as like, "
        r"which has none \(its counters are 0-d\)",
    ):
        mgr.restore_best(one_model(), member=0)
    with pytest.raises(ConfigError, match=r"which has members 0 to 2: pass the stacked state"):
        mgr.restore_best(stacked_states(1)[0], member=3)
