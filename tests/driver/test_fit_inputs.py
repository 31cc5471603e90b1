"""`fit` under hostile inputs: data that yields nothing, a resume with other data, options without
what they act on, and the dict form of early stopping. Each is a `ConfigError` that names the
fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import functrain as ft
from functrain.driver.data import epoch_order
from functrain.errors import ConfigError
from tests.driver.runs import linear_state, sum_dataset
from tests.models import loss_fn


def quiet_fit(state: ft.TrainState, data: Any, **kwargs: Any) -> ft.FitResult:
    """`fit` without a progress bar or log lines, and without a default batch size: the inputs
    here bring their own batches, or ask for one."""
    return ft.fit(state, data, progress=False, verbosity="silent", **kwargs)


class OneShot:
    """A re-iterable on the surface whose iterator is spent after one pass (a common slip)."""

    def __init__(self, batches: list[Any]) -> None:
        self.it = iter(batches)

    def __iter__(self) -> Any:
        return self.it


class Empty:
    def __iter__(self) -> Any:
        return iter(())


# ------------------------------------------------------------------ data that yields no batch

EMPTY_BATCH = (torch.zeros(0, 3), torch.zeros(0, 1))


@pytest.mark.parametrize("limit", [{"max_steps": 5}, {"max_epochs": 2}])
@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (sum_dataset(0), {"batch_size": 4}, r"train_data is empty \(0 samples\)"),
        (
            sum_dataset(5),
            {"batch_size": 8, "drop_last": True},
            r"5 samples with batch_size=8 and drop_last=True drop them all; pass drop_last=False "
            r"or batch_size <= 5",
        ),
        ([EMPTY_BATCH, EMPTY_BATCH], {}, r"train_data's 2 batches all hold 0 samples"),
        ([], {}, r"train_data is empty \(a list of length 0\)"),
        (
            DataLoader(sum_dataset(0), batch_size=4),
            {},
            r"train_data is empty \(a DataLoader of length 0\)",
        ),
    ],
)
def test_data_that_yields_no_batch_is_refused_before_the_run(
    data: Any, kwargs: dict[str, Any], message: str, limit: dict[str, int]
) -> None:
    with pytest.raises(ConfigError, match=message):
        quiet_fit(linear_state(), data, **kwargs, **limit)


def test_a_source_empty_in_its_first_epoch_is_refused_at_once_instead_of_looping() -> None:
    with pytest.raises(
        ConfigError, match=r"yielded no batch with samples in epoch 0 \(the source yields nothing\)"
    ):
        quiet_fit(linear_state(), Empty(), max_steps=3)


def test_a_one_shot_iterator_is_refused_at_the_epoch_it_runs_dry() -> None:
    batches = [(torch.randn(4, 3), torch.randn(4, 1))] * 2
    with pytest.raises(
        ConfigError,
        match=r"in epoch 1 \(earlier epochs had batches: a one-shot iterator is exhausted "
        r"after one pass",
    ):
        quiet_fit(linear_state(), OneShot(batches), max_steps=10)


# ------------------------------------------------------------------ resuming with other data


def interrupted(tmp_path: Path, **kwargs: Any) -> Path:
    """Train 3 batches of 8 out of 64 samples and checkpoint there (mid-epoch)."""
    quiet_fit(
        linear_state(),
        sum_dataset(64),
        batch_size=8,
        max_steps=3,
        save_every=3,
        checkpoint_dir=tmp_path,
        **kwargs,
    )
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 32}, r"batch_size: the checkpoint's run used 8, this call gives 32"),
        ({"data_seed": 3}, r"data_seed: the checkpoint's run used 0, this call gives 3"),
        ({"shuffle": False}, r"shuffle: the checkpoint's run used True, this call gives False"),
        ({"drop_last": True}, r"drop_last: the checkpoint's run used False, this call gives True"),
        (
            {"data": sum_dataset(80)},
            r"the dataset's size \(len\(train_data\)\): the checkpoint's run used 64, this call "
            r"gives 80",
        ),
    ],
)
def test_a_resume_that_changes_the_data_setup_is_refused_naming_the_change(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    interrupted(tmp_path)
    kwargs = {"batch_size": 8, "data": sum_dataset(64), **change}
    with pytest.raises(ConfigError, match=message) as info:
        quiet_fit(
            linear_state(),
            kwargs.pop("data"),
            max_steps=10,
            checkpoint_dir=tmp_path,
            resume=True,
            **kwargs,
        )
    assert "skip or repeat samples" in str(
        info.value
    ) and "to resume, give the data and arguments the interrupted run used" in str(info.value)
    assert str(info.value).count("\n  - ") == 1


def test_a_resume_with_another_dataloader_is_refused(tmp_path: Path) -> None:
    quiet_fit(
        linear_state(),
        DataLoader(sum_dataset(64), batch_size=8),
        max_steps=3,
        save_every=3,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(
        ConfigError,
        match=r"batches per epoch \(len\(train_data\)\): the checkpoint's run used 8, this "
        r"call gives 2",
    ) as info:
        quiet_fit(
            linear_state(),
            DataLoader(sum_dataset(64), batch_size=32),
            max_steps=10,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    assert "batch_size: the checkpoint's run used 8, this call gives 32" in str(info.value)


def test_the_fix_in_the_data_change_error_starts_a_new_run_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    interrupted(tmp_path / "a")
    with pytest.raises(ConfigError) as info:
        quiet_fit(
            linear_state(),
            sum_dataset(64),
            batch_size=32,
            max_steps=10,
            checkpoint_dir=tmp_path / "a",
            resume=True,
        )
    call = re.search(
        r"state = (functrain\.load\(.*?\)\.replace\(.*?\)\)), then fit", str(info.value)
    )
    assert call is not None
    state = eval(call.group(1), {"functrain": ft, "torch": torch, "state": linear_state()})  # noqa: S307 - the message's own code
    result = quiet_fit(
        state, sum_dataset(64), batch_size=32, max_steps=5, checkpoint_dir=tmp_path / "b"
    )
    assert int(result.state.step) == 5 and result.state.driver["data"]["batch_size"] == 32


def test_batch_size_may_change_where_an_epoch_starts_and_the_order_by_samples_is_kept(
    tmp_path: Path,
) -> None:
    seen: list[torch.Tensor] = []

    def recording_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(batch[0].detach().clone())
        return loss_fn(model, batch)

    def state() -> ft.TrainState:
        return ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.05), recording_loss)

    quiet_fit(
        state(), sum_dataset(64), batch_size=8, max_epochs=1, checkpoint_dir=tmp_path
    )  # saves at the epoch's end
    result = quiet_fit(
        state(), sum_dataset(64), batch_size=32, max_epochs=2, checkpoint_dir=tmp_path, resume=True
    )
    assert int(result.state.step) == 8 + 2 and result.state.driver["data"]["batch_size"] == 32
    order = epoch_order(64, 0, 1)
    assert [len(b) for b in seen[8:]] == [32, 32]
    assert torch.equal(torch.cat(seen[8:]), sum_dataset(64).tensors[0][order])


def test_a_resume_with_the_same_data_setup_goes_on(tmp_path: Path) -> None:
    interrupted(tmp_path)
    result = quiet_fit(
        linear_state(),
        sum_dataset(64),
        batch_size=8,
        max_steps=10,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert int(result.state.step) == 10


def test_one_fit_per_phase_takes_each_phases_data_as_a_torch_loop_does(tmp_path: Path) -> None:
    # a curriculum: the first 24 samples for 2 epochs, then all 40 for 2 more, each phase a fit
    # of its own from the previous phase's state, as a torch loop builds a loader per phase
    data = sum_dataset(40)
    phases = [(Subset(data, range(24)), 2), (data, 4)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    epoch = 0
    for phase, until in phases:
        for _ in range(epoch, until):
            for x, y in DataLoader(phase, batch_size=8):
                optimizer.zero_grad()
                loss_fn(module, (x, y)).backward()
                optimizer.step()
        epoch = until
    state = linear_state(ft.sgd(0.05, fused=False))
    for k, (phase, until) in enumerate(phases):
        state = quiet_fit(
            state,
            phase,
            batch_size=8,
            shuffle=False,
            max_epochs=until,
            checkpoint_dir=tmp_path / str(k),
            resume=True,
        ).state
    assert int(state.step) == 2 * 3 + 2 * 5 and state.driver["data"]["samples"] == 40
    assert all(torch.equal(p, state.params[name]) for name, p in module.named_parameters())


@pytest.mark.parametrize(
    ("limit", "counter"), [({"max_epochs": 2}, "epoch 2"), ({"max_steps": 6}, "update 6")]
)
def test_a_trained_state_given_at_its_limit_is_refused_not_returned_untrained(
    limit: dict[str, int], counter: str
) -> None:
    # one fit per task: the next task's fit given the last one's state and the same limit
    first = quiet_fit(linear_state(), sum_dataset(24), batch_size=8, max_epochs=2)
    name, value = next(iter(limit.items()))
    with pytest.raises(
        ConfigError,
        match=rf"fit got a state at {counter} and {name}={value}: it would end before its first "
        rf"update(.|\n)*pass {name}={value} \+ the",
    ):
        quiet_fit(first.state, sum_dataset(24), batch_size=8, **limit)
    second = quiet_fit(first.state, sum_dataset(24), batch_size=8, **{name: 2 * value})
    assert int(second.state.step) == 12 and not torch.equal(
        second.state.params["weight"], first.state.params["weight"]
    )


def test_a_state_given_mid_epoch_with_other_data_is_refused_naming_the_fix() -> None:
    first = quiet_fit(linear_state(), sum_dataset(24), batch_size=8, max_steps=2)
    with pytest.raises(
        ConfigError,
        match=r"the state given to fit is in the middle of an epoch of data of another setup(.|\n)*"
        r"the dataset's size \(len\(train_data\)\): the state's run used 24, this call gives 40",
    ) as info:
        quiet_fit(first.state, sum_dataset(40), batch_size=8, max_epochs=1)
    fix = re.search(r"pass (state\.replace\(.*?\)\)) \(", str(info.value))
    assert fix is not None and "checkpoint" not in str(info.value)
    state = eval(fix.group(1), {"torch": torch, "state": first.state})  # noqa: S307 - the message's own code
    result = quiet_fit(state, sum_dataset(40), batch_size=8, max_epochs=1)
    assert int(result.state.step) == 2 + 5


# ------------------------------------------------------------------ options without what they act
# on


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"early_stopping": ft.EarlyStopping(patience=2)},
            r"early_stopping=EarlyStopping\(target='val_loss'.* needs eval_data=\.\.\.",
        ),
        (
            {"early_stopping": {"patience": 2}},
            r"early_stopping=\{'patience': 2\} needs eval_data=\.\.\.",
        ),
        ({"eval_every": 2}, r"eval_every=2 needs eval_data=\.\.\."),
        ({"best_metric": "val_acc"}, r"best_metric='val_acc' needs eval_data=\.\.\."),
        ({"mode": "max"}, r"mode='max' needs eval_data=\.\.\."),
        ({"eval_batch_size": 4}, r"eval_batch_size=4 needs eval_data=\.\.\."),
        ({"keep_last": 2}, r"keep_last=2 needs checkpoint_dir=\.\.\."),
        ({"keep_best": 3}, r"keep_best=3 needs checkpoint_dir=\.\.\."),
        ({"async_save": True}, r"async_save=True needs checkpoint_dir=\.\.\."),
        ({"save_every": 5}, r"save_every=5 needs checkpoint_dir=\.\.\."),
    ],
)
def test_an_option_without_the_data_or_directory_it_acts_on_is_refused(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        quiet_fit(linear_state(), sum_dataset(64), batch_size=8, max_epochs=1, **kwargs)


def test_eval_batch_size_with_test_data_alone_is_accepted() -> None:
    result = quiet_fit(
        linear_state(),
        sum_dataset(64),
        test_data=sum_dataset(64),
        batch_size=8,
        eval_batch_size=16,
        max_epochs=1,
    )
    assert set(result.test) == {"test_loss"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_epochs": True}, r"max_epochs must be an int >= 1 or None, got max_epochs=True"),
        ({"batch_size": 8.0}, r"batch_size must be an int >= 1 or None, got batch_size=8\.0"),
        (
            {"data_seed": "7"},
            r"data_seed must be an int in \[-2\*\*63, 2\*\*64\), got data_seed='7'",
        ),
        (
            {"data_seed": 2**64},
            r"data_seed must be an int in \[-2\*\*63, 2\*\*64\), got "
            r"data_seed=18446744073709551616",
        ),
        ({"shuffle": "yes"}, r"shuffle must be True or False, got shuffle='yes'"),
        ({"num_workers": -1}, r"num_workers must be an int >= 0, got num_workers=-1"),
        (
            {"callbacks": ft.LRMonitor()},
            r"callbacks must be a list of callbacks, got LRMonitor: pass callbacks=\[\.\.\.\]",
        ),
        ({"log_every": 10**30 + 0.5}, r"log_every must be an int >= 1"),
    ],
)
def test_arguments_of_the_wrong_type_are_config_errors(
    kwargs: dict[str, Any], message: str
) -> None:
    kwargs = {"batch_size": 8, "max_epochs": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        quiet_fit(linear_state(), sum_dataset(64), **kwargs)


def test_train_data_none_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"train_data must be a dataset or a re-iterable of batches, got None"
    ):
        quiet_fit(linear_state(), None, max_epochs=1)


# ------------------------------------------------------------------ early stopping as a dict


def test_early_stopping_accepts_the_runner_spec_dict() -> None:
    data = sum_dataset(64)
    as_dict = quiet_fit(
        linear_state(ft.sgd(0.5)),
        data,
        eval_data=data,
        batch_size=8,
        max_epochs=30,
        early_stopping={"target": "val_loss", "patience": 1, "mode": "min", "min_delta": 10.0},
    )
    as_value = quiet_fit(
        linear_state(ft.sgd(0.5)),
        data,
        eval_data=data,
        batch_size=8,
        max_epochs=30,
        early_stopping=ft.EarlyStopping("val_loss", patience=1, min_delta=10.0),
    )
    assert as_dict.stop_reason == as_value.stop_reason == "early_stopping"
    assert int(as_dict.state.epoch) == int(as_value.state.epoch) == 2


def test_early_stopping_dict_problems_are_listed_together() -> None:
    data = sum_dataset(64)
    with pytest.raises(ConfigError) as info:
        quiet_fit(
            linear_state(),
            data,
            eval_data=data,
            batch_size=8,
            max_epochs=1,
            early_stopping={
                "patinece": 3,
                "patience": 0,
                "mode": "up",
                "min_delta": float("nan"),
                "target": 3,
            },
        )
    message = str(info.value)
    for line in [
        "early_stopping has unknown keys ['patinece']: expected some of ['target', 'patience', "
        "'mode', 'min_delta']",
        "early_stopping['target'] must be a metric name such as 'val_loss', got 3",
        "early_stopping['patience'] must be an int >= 1, got 0",
        "early_stopping['mode'] must be 'min' or 'max', got 'up'",
        "early_stopping['min_delta'] must be a finite number >= 0, got nan",
    ]:
        assert f"\n  - {line}" in message, line


@pytest.mark.parametrize(
    ("early", "fit_mode"),
    [({"target": "val_loss", "mode": "max"}, {}), ({"target": "val_loss"}, {"mode": "max"})],
)
def test_early_stopping_and_best_metric_watching_one_metric_in_opposite_directions_are_refused(
    early: dict[str, Any], fit_mode: dict[str, str]
) -> None:
    # the best checkpoint would be the evaluation early stopping counts as the worst
    data = sum_dataset(64)
    early_mode, mode = early.get("mode", "min"), fit_mode.get("mode", "min")
    with pytest.raises(
        ConfigError,
        match=rf"early_stopping watches 'val_loss' with mode='{early_mode}', but fit keeps the "
        rf"best 'val_loss' with mode='{mode}'.* give both one direction",
    ):
        quiet_fit(
            linear_state(),
            data,
            eval_data=data,
            batch_size=8,
            max_epochs=1,
            early_stopping=early,
            **fit_mode,
        )


def test_early_stopping_of_another_type_is_a_config_error() -> None:
    data = sum_dataset(64)
    with pytest.raises(
        ConfigError,
        match=r"early_stopping must be an EarlyStopping, a dict with keys \['target', "
        r"'patience', 'mode', 'min_delta'\] or None, got int",
    ):
        quiet_fit(
            linear_state(), data, eval_data=data, batch_size=8, max_epochs=1, early_stopping=5
        )


# ------------------------------------------------------------------ found at run time


def test_a_best_metric_no_evaluation_produces_is_refused_at_the_first_one_naming_those_it_has() -> (
    None
):
    data = sum_dataset(64)
    with pytest.raises(
        ConfigError,
        match=r"best_metric='val_acc' is not among the evaluation's metrics \['val_loss'\]: "
        r"pass one of them",
    ) as info:
        quiet_fit(
            linear_state(),
            data,
            eval_data=data,
            batch_size=8,
            max_epochs=3,
            best_metric="val_acc",
            mode="max",
        )
    assert "step 8" not in str(info.value)


def nan_from_step(bad: int) -> Any:
    def schedule(step: Any) -> Any:
        return torch.where(torch.as_tensor(step) < bad, 0.05, float("nan")).double()

    return schedule


@pytest.mark.parametrize(
    ("kwargs", "found_at", "saved"),
    [
        ({"log_every": 2, "save_every": 4}, 6, [4]),  # read at the log interval of update 6
        ({"log_every": 100, "save_every": 3}, 6, [3]),  # read at the save of update 6
        ({"log_every": 100}, 8, []),  # read at the epoch's end, before its save
    ],
)
def test_a_schedule_turning_nan_during_the_run_stops_it_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, kwargs: dict[str, int], found_at: int, saved: list[int]
) -> None:
    state = linear_state(ft.sgd(nan_from_step(5)))  # the rate of update 6 is NaN
    message = (
        rf"the learning rate was nan in an update up to step {found_at} \(epoch 0\): "
        r"the schedule gives a non-finite value there; fix the schedule"
    )
    with pytest.raises(ConfigError, match=message):
        quiet_fit(
            state, sum_dataset(64), batch_size=8, max_epochs=2, checkpoint_dir=tmp_path, **kwargs
        )
    paths = sorted(tmp_path.glob("ckpt-*"))
    assert [int(ft.load(p, like=state).step) for p in paths] == saved
    for path in paths:
        assert all(
            bool(torch.isfinite(p).all()) for p in ft.load(path, like=state).params.values()
        ), path


def test_map_style_eval_data_beside_a_loader_is_told_to_pass_eval_batch_size() -> None:
    data = sum_dataset()
    with pytest.raises(ConfigError, match=r"eval_data is a map-style dataset .* eval_batch_size="):
        ft.fit(
            linear_state(),
            DataLoader(data, batch_size=20),
            eval_data=data,
            max_epochs=1,
            progress=False,
            verbosity="silent",
        )


@pytest.mark.parametrize(
    ("argument", "sets", "kind"),
    [
        ("eval_data", lambda a, b: [a, b], "list"),
        ("eval_data", lambda a, b: {"a": a, "b": b}, "dict"),
        (
            "test_data",
            lambda a, b: (DataLoader(a, batch_size=8), DataLoader(b, batch_size=8)),
            "tuple",
        ),
    ],
)
def test_several_validation_sets_are_refused_before_the_run_naming_the_fix(
    argument: str, sets: Any, kind: str
) -> None:
    # as Lightning takes several validation loaders: a list was handed to the loss function as
    # batches, a dict indexed as a dataset by 0 (a KeyError)
    data = sum_dataset()
    calls: list[int] = []

    def counted(model: nn.Module, batch: Any) -> torch.Tensor:
        calls.append(1)
        return loss_fn(model, batch)

    with pytest.raises(
        ConfigError,
        match=rf"{argument} must be one data set .* got a {kind} of 2 data sets: fit evaluates "
        r"one set; .*functrain\.evaluate\(run\.state, loader, prefix='val_other_'\)",
    ):
        quiet_fit(
            linear_state(loss=counted),
            data,
            **{argument: sets(sum_dataset(16), sum_dataset(8))},
            batch_size=8,
            max_epochs=1,
        )
    assert not calls


class _Complex128(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.complex128))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w.T


class _CsrAdjacency(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("adjacency", torch.eye(4).to_sparse_csr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.sparse.mm(self.adjacency, x.T).T)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["torch.complex128", "torch.sparse_csr"])
def test_tensors_no_checkpoint_holds_are_refused_before_the_first_update(
    tmp_path: Path, kind: str
) -> None:
    # complex128 weights and a CSR buffer train (as torch's loop trains them) but no safetensors
    # file holds them: the run is refused at the start, not after an epoch trained and lost at
    # its first save
    updates: list[int] = []
    counting = ft.on("batch_end")(lambda run: updates.append(run.step))
    if kind == "torch.complex128":
        z = torch.randn(16, 4, dtype=torch.complex128)
        data = torch.utils.data.TensorDataset(z, torch.randn(16, 3, dtype=torch.complex128))
        fitted = lambda m, b: (m(b[0]) - b[1]).abs().pow(2).mean()  # noqa: E731
        state = ft.TrainState.create(_Complex128(), ft.adam(1e-2, fused=False), fitted)
    else:
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 3))
        fitted = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
        state = ft.TrainState.create(_CsrAdjacency(), ft.adam(1e-2), fitted)
    with pytest.raises(ft.CheckpointError, match=rf"state holds tensors of {kind}, which"):
        quiet_fit(
            state, data, batch_size=4, max_epochs=1, checkpoint_dir=tmp_path, callbacks=[counting]
        )
    assert updates == [] and not any(tmp_path.iterdir())
    assert int(quiet_fit(state, data, batch_size=4, max_epochs=1).state.step) == 4
