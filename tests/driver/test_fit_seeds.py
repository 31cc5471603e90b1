"""What a trainer's users expect of `fit` beyond the loop: their own state in the checkpoints,
warm starts, devices, stopping on non-finite values, a test set at each evaluation, epoch rows,
gradient statistics, memory, versions and schedules in epochs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.checkpoint.format import write_tree
from functrain.driver import loop as loop_module
from functrain.driver.data import to_device
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.driver.runs import BATCH, N_SAMPLES, dataset, make_module, make_state, quiet_fit
from tests.models import loss_fn

# ---------------------------------------------------------------- user state


class CountBatches(ft.Callback):
    """Keeps a tensor count and a JSON list in the run's user state."""

    def on_batch_end(self, run: ft.Run) -> None:
        user = run.user
        run.user = {
            "batches": user.get("batches", torch.zeros((), dtype=torch.int64)) + 1,
            "epochs_seen": list(user.get("epochs_seen", [])),
        }

    def on_epoch_end(self, run: ft.Run) -> None:
        run.user = {**run.user, "epochs_seen": [*run.user["epochs_seen"], run.epoch]}


def test_user_state_set_by_callbacks_is_in_the_result_and_the_checkpoints(tmp_path: Path) -> None:
    result = quiet_fit(
        make_state(),
        dataset(),
        max_epochs=2,
        checkpoint_dir=tmp_path / "ck",
        callbacks=[CountBatches()],
    )
    assert int(result.state.user["batches"]) == 6 and result.state.user["epochs_seen"] == [1, 2]
    restored = ft.load(result.checkpoints["latest"], like=make_state())
    assert int(restored.user["batches"]) == 6 and restored.user["epochs_seen"] == [1, 2]


def test_user_state_is_restored_on_resume_and_handed_to_callbacks(tmp_path: Path) -> None:
    seen = []

    @ft.on("train_begin")
    def record(run: ft.Run) -> None:
        seen.append(int(run.user["batches"]) if "batches" in run.user else None)

    quiet_fit(
        make_state(), dataset(), max_epochs=1, checkpoint_dir=tmp_path, callbacks=[CountBatches()]
    )
    result = quiet_fit(
        make_state(),
        dataset(),
        max_epochs=3,
        checkpoint_dir=tmp_path,
        resume=True,
        callbacks=[CountBatches(), record],
    )
    assert (
        seen == [3]
        and int(result.state.user["batches"]) == 9
        and result.state.user["epochs_seen"] == [1, 2, 3]
    )


def test_user_state_given_to_the_initial_state_is_kept_and_saved(tmp_path: Path) -> None:
    state = make_state().replace(user={"note": "run 7", "scale": torch.tensor(2.5)})
    result = quiet_fit(state, dataset(), max_epochs=1, checkpoint_dir=tmp_path)
    restored = ft.load(result.checkpoints["latest"], like=make_state())
    assert restored.user["note"] == "run 7" and torch.equal(
        restored.user["scale"], torch.tensor(2.5)
    )


def test_run_user_must_be_a_dict() -> None:
    @ft.on("batch_end")
    def bad(run: ft.Run) -> None:
        run.user = 3

    with pytest.raises(ConfigError, match=r"run.user must be a dict .*got int"):
        quiet_fit(make_state(), dataset(), max_epochs=1, callbacks=[bad])


# ---------------------------------------------------------------- warm start


def trained_checkpoint(tmp_path: Path, **options: Any) -> tuple[ft.TrainState, Path]:
    result = quiet_fit(make_state(**options), dataset(), max_epochs=2)
    return result.state, ft.save(result.state, tmp_path / "trained")


def test_load_weights_starts_a_new_run_with_another_optimizer_lr_and_trainable_set(
    tmp_path: Path,
) -> None:
    saved, path = trained_checkpoint(tmp_path)
    into = make_state(
        ft.adamw(3e-4), trainable=lambda name, p: name.startswith("2."), ema_decay=0.9
    )
    with pytest.raises(
        ft.StateMismatchError, match=r"functrain\.load_weights\('.*trained', into=state\)"
    ):
        ft.load(path, like=into)
    warm = ft.load_weights(path, into=into)
    assert sorted(warm.params) == ["2.bias", "2.weight"] and sorted(warm.frozen) == [
        "0.bias",
        "0.weight",
    ]
    for name, value in saved.params.items():
        assert torch.equal({**warm.params, **warm.frozen}[name], value), name
    assert int(warm.step) == 0 and torch.equal(
        warm.ema_params["2.weight"], saved.params["2.weight"]
    )
    result = quiet_fit(warm, dataset(), max_epochs=1)
    assert torch.equal(result.state.frozen["0.weight"], saved.params["0.weight"])
    assert not torch.equal(result.state.params["2.weight"], saved.params["2.weight"])


def test_load_weights_lists_weights_that_do_not_fit(tmp_path: Path) -> None:
    _, path = trained_checkpoint(tmp_path)
    other = ft.TrainState.create(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), ft.sgd(0.1), loss_fn
    )
    with pytest.raises(
        ft.StateMismatchError,
        match=r"params/2\.weight: expected \[2, 8\] torch\.float32, got \[1, 8\] torch\.float32",
    ) as refused:
        ft.load_weights(path, into=other)
    # (a head of another size is not loaded by strict=False either: the hint says so)
    assert "loads with strict=False neither" in str(refused.value)
    with pytest.raises(ft.StateMismatchError, match=r"params/2\.weight: expected \[2, 8\]"):
        ft.load_weights(path, into=other, strict=False)


def test_load_weights_hints_what_works_for_each_way_weights_do_not_fit(tmp_path: Path) -> None:
    """Each hint names what loads: strict=False for names alone, not for a head of another size
    (extra names beside it too), and the dtype's own way (torch would cast)."""
    _, path = trained_checkpoint(tmp_path)
    cases = {  # (the model: Linear(3, 8), Tanh, Linear(8, 1))
        "extra and shape": (
            nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2, bias=False)),
            ["loads with strict=False neither"],
            ["(with strict=False"],
        ),
        "dtype": (
            nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double(),
            ["is not cast"],
            ["(with strict=False", "loads with strict=False neither"],
        ),
    }
    for name, (model, said, unsaid) in cases.items():
        into = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
        with pytest.raises(ft.StateMismatchError) as refused:
            ft.load_weights(path, into=into)
        message = str(refused.value)
        assert all(s in message for s in said) and not any(s in message for s in unsaid), name


def test_load_weights_lists_a_value_that_is_no_tensor_where_a_weight_is(tmp_path: Path) -> None:
    into = ft.TrainState.create(nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
    tree = {"params": {"weight": torch.zeros(1, 2), "bias": None}, "frozen": {}, "buffers": {}}
    path = write_tree(tmp_path / "c", tree)
    with pytest.raises(ft.StateMismatchError, match=r"params/bias: expected Tensor"):
        ft.load_weights(path, into=into)


def test_load_weights_not_strict_keeps_the_states_own_new_layers(tmp_path: Path) -> None:
    saved, path = trained_checkpoint(tmp_path)
    bigger = ft.TrainState.create(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1)),
        ft.sgd(0.1),
        loss_fn,
    )
    with pytest.raises(
        ft.StateMismatchError,
        match=r"(?s)missing from the checkpoint: \['params/3\.bias', "
        r"'params/3\.weight'\].*strict=False",
    ):
        ft.load_weights(path, into=bigger)
    warm = ft.load_weights(path, into=bigger, strict=False)
    assert torch.equal(warm.params["0.weight"], saved.params["0.weight"]) and torch.equal(
        warm.params["3.weight"], bigger.params["3.weight"]
    )


def test_load_weights_not_strict_refuses_a_checkpoint_whose_names_all_differ(
    tmp_path: Path,
) -> None:
    """A checkpoint saved under a prefix (a compiled module's ``_orig_mod.``): torch's
    load_state_dict(strict=False) loads none of it and lists every key as missing; load_weights
    refuses rather than leave every weight as created, and its fix loads them all."""
    saved, path = trained_checkpoint(tmp_path)
    wrapped = nn.Sequential()
    wrapped.add_module("_orig_mod", nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)))
    into = ft.TrainState.create(wrapped, ft.sgd(0.1), loss_fn)
    missing = wrapped.load_state_dict(saved.export_module().state_dict(), strict=False)
    assert len(missing.missing_keys) == len(into.params)  # torch: nothing loaded
    with pytest.raises(
        ft.StateMismatchError,
        match=r"(?s)holds no weight or buffer of the state's model.*lack the prefix "
        r"'_orig_mod\.' the model's carry: 4 of them match without it.*functrain\.load\(",
    ):
        ft.load_weights(path, into=into, strict=False)
    with pytest.raises(ft.StateMismatchError, match=r"lack the prefix '_orig_mod\.'") as refused:
        ft.load_weights(path, into=into)
    assert "(with strict=False" not in str(refused.value)
    tree, _ = ft.load(path)  # the message's fix
    weights = {**tree["params"], **tree["frozen"], **tree["buffers"]}
    wrapped.load_state_dict({f"_orig_mod.{k}": v for k, v in weights.items()})
    warm = ft.TrainState.create(wrapped, ft.sgd(0.1), loss_fn)
    for name, value in saved.params.items():
        assert torch.equal(warm.params[f"_orig_mod.{name}"], value), name


def test_load_weights_not_strict_loads_the_buffers_alone_a_checkpoint_shares(
    tmp_path: Path,
) -> None:
    """A new model that keeps an earlier run's normalizing statistics (buffers) and none of its
    weights: torch's load_state_dict(strict=False) loads the buffers; so does load_weights."""

    class Normalized(nn.Module):
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x - self.mean)

    old = Normalized(nn.Linear(3, 1))
    old.mean.fill_(2.0)
    path = ft.save(ft.TrainState.create(old, ft.sgd(0.1), loss_fn), tmp_path / "old")
    new = Normalized(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
    into = ft.TrainState.create(new, ft.sgd(0.1), loss_fn)
    new.load_state_dict(old.state_dict(), strict=False)  # torch: the buffer loads
    loaded = ft.load_weights(path, into=into, strict=False)
    assert torch.equal(loaded.buffers["mean"], new.mean)
    assert_trees_equal(loaded.params, into.params)


def test_load_weights_needs_a_train_state_checkpoint(tmp_path: Path) -> None:
    path = ft.save({"w": torch.zeros(2)}, tmp_path / "tree")
    with pytest.raises(
        ft.CheckpointError, match=r"does not hold a TrainState \(params, frozen, buffers\)"
    ):
        ft.load_weights(path, into=make_state())


# ---------------------------------------------------------------- versions

# the running torch's release, which a checkpoint saved here records: 2.13.0 of 2.13.0+cpu
RELEASE = torch.__version__.partition("+")[0]


@pytest.mark.parametrize(
    ("torch_version", "functrain_version", "message"),
    [
        (
            "9.1.0+cpu",
            None,
            rf"written by torch {re.escape(RELEASE)}\S*; this is torch 9\.1\.0\+cpu: it loads",
        ),
        (None, "0.9.0", r"written by functrain 0\.1\.0; this is functrain 0\.9\.0: it loads"),
        (
            "9.1.0",
            "1.0.0",
            r"written by torch \S+ and functrain 0\.1\.0; this is torch 9\.1\.0 and functrain "
            r"1\.0\.0",
        ),
    ],
)
def test_a_checkpoint_of_other_versions_loads_with_a_warning_naming_both(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    torch_version: str | None,
    functrain_version: str | None,
    message: str,
) -> None:
    state = make_state()
    path = ft.save(state, tmp_path / "ckpt")
    if torch_version:
        monkeypatch.setattr(torch, "__version__", torch_version)
    if functrain_version:
        monkeypatch.setattr(ft.version, "__version__", functrain_version)
    with pytest.warns(ft.VersionWarning, match=message):
        restored = ft.load(path, like=state)
    assert torch.equal(restored.params["0.weight"], state.params["0.weight"])
    with pytest.warns(ft.VersionWarning, match=message):
        ft.load_weights(path, into=state)


@pytest.mark.parametrize(
    ("torch_version", "functrain_version"),
    [(RELEASE, None), (f"{RELEASE}+cu128", None), (None, "0.1.7")],
    ids=["release", "build-label", "functrain-patch"],
)
def test_a_build_label_or_a_functrain_patch_release_loads_without_a_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    torch_version: str | None,
    functrain_version: str | None,
) -> None:
    path = ft.save(make_state(), tmp_path / "ckpt")
    if torch_version:
        monkeypatch.setattr(torch, "__version__", torch_version)
    if functrain_version:
        monkeypatch.setattr(ft.version, "__version__", functrain_version)
    ft.load(path, like=make_state())  # warnings are errors here


# ---------------------------------------------------------------- stopping on non-finite values


def script_val_loss(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """fit's validation returns `values` in turn as ``val_loss`` (other prefixes stay real)."""
    real, pending = loop_module.evaluate, list(values)

    def scripted(
        state: ft.TrainState, data: Any, *, use_ema: bool = False, prefix: str = "val_", **kw: Any
    ) -> dict[str, float]:
        return (
            real(state, data, use_ema=use_ema, prefix=prefix, **kw)
            if prefix != "val_"
            else {"val_loss": pending.pop(0)}
        )

    monkeypatch.setattr(loop_module, "evaluate", scripted)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_validation_loss_stops_the_run_and_keeps_the_last_finite_checkpoints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: float
) -> None:
    script_val_loss(monkeypatch, [0.5, 0.4, bad, 0.3, 0.2])
    data = dataset()
    result = quiet_fit(make_state(), data, eval_data=data, max_epochs=4, checkpoint_dir=tmp_path)
    assert result.stop_reason == "nonfinite_val_loss" and int(result.state.step) == 9
    last = result.history.rows["eval"][-1]["val_loss"]
    assert last == bad or (last != last and bad != bad)
    for which in ("latest", "best"):
        assert int(ft.load(result.checkpoints[which], like=make_state()).step) == 6, which
    assert result.best == {"step": 6, "val_loss": 0.4}
    resumed = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        max_epochs=4,
        checkpoint_dir=tmp_path,
        resume=True,
        stop_on_nonfinite="none",
    )
    assert int(resumed.state.step) == 12  # the run goes on from the last finite checkpoint


def test_stop_on_nonfinite_none_trains_on(monkeypatch: pytest.MonkeyPatch) -> None:
    script_val_loss(monkeypatch, [0.5, float("nan"), 0.3])
    result = quiet_fit(
        make_state(), dataset(), eval_data=dataset(), max_epochs=3, stop_on_nonfinite="none"
    )
    assert result.stop_reason == "max_epochs"


def nan_at_epoch_one(data: TensorDataset) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    batches = [tuple(t[i : i + BATCH] for t in data.tensors) for i in range(0, len(data), BATCH)]
    x, y = batches[1]
    return batches[:1] + [(torch.full_like(x, float("nan")), y)] + batches[2:]


class Epochs:
    """Batches for each epoch in turn (a re-iterable source)."""

    def __init__(self, epochs: list[list[Any]]) -> None:
        self.epochs, self.i = epochs, 0

    def __iter__(self) -> Any:
        self.i += 1
        return iter(self.epochs[min(self.i - 1, len(self.epochs) - 1)])


def test_stop_on_nonfinite_train_stops_at_the_log_interval_of_a_nonfinite_loss(
    tmp_path: Path,
) -> None:
    good = [tuple(t[i : i + BATCH] for t in dataset().tensors) for i in range(0, N_SAMPLES, BATCH)]
    data = [good, nan_at_epoch_one(dataset()), good]
    result = quiet_fit(
        make_state(),
        Epochs(data),
        max_epochs=3,
        log_every=1,
        stop_on_nonfinite="train",
        checkpoint_dir=tmp_path,
    )
    assert result.stop_reason == "nonfinite_loss" and int(result.state.step) == 5
    assert (
        int(ft.load(result.checkpoints["latest"], like=make_state()).step) == 3
    )  # the epoch's end before
    assert all(
        torch.isfinite(p).all() for p in result.state.params.values()
    )  # the update was skipped
    by_default = quiet_fit(make_state(), Epochs(data), max_epochs=3, log_every=1)
    assert by_default.stop_reason == "max_epochs" and int(by_default.state.skipped) == 1


# ---------------------------------------------------------------- test set at each evaluation


def test_test_every_eval_adds_the_test_metrics_to_each_eval_row() -> None:
    data, test = dataset(0), dataset(1, n=30)
    state = make_state(ema_decay=0.5)
    result = quiet_fit(
        state, data, eval_data=data, test_data=test, max_epochs=2, test_every_eval=True
    )
    rows = result.history.rows["eval"]
    assert [sorted(k for k in r if k.startswith("test_")) for r in rows] == [
        ["test_ema_loss", "test_loss"]
    ] * 2
    batches = list(ft.Batcher(test, BATCH, shuffle=False).epoch(0))
    assert rows[-1]["test_loss"] == ft.evaluate(result.state, batches, prefix="test_")["test_loss"]
    assert result.test is not None  # the final test of the best weights is still there
    plain = quiet_fit(state, data, eval_data=data, test_data=test, max_epochs=2)
    assert all(not any(k.startswith("test_") for k in r) for r in plain.history.rows["eval"])


def test_test_every_eval_needs_test_and_eval_data() -> None:
    with pytest.raises(
        ConfigError, match=r"test_every_eval=True needs test_data=\.\.\. and eval_data=\.\.\."
    ):
        quiet_fit(make_state(), dataset(), eval_data=dataset(), max_epochs=1, test_every_eval=True)


# ---------------------------------------------------------------- epoch rows and the last window


def test_epoch_rows_carry_the_epochs_mean_of_every_training_metric() -> None:
    def with_metric(model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = loss_fn(model, batch)
        return loss, {"twice": 2 * loss}

    state = ft.TrainState.create(make_module(), ft.sgd(0.05), with_metric, grad_norm=True)
    result = quiet_fit(state, dataset(), max_epochs=2, log_every=1)
    train, epochs = result.history.rows["train"], result.history.rows["epoch"]
    for e, row in enumerate(epochs):
        rows = train[3 * e : 3 * e + 3]
        for key in ("loss", "grad_norm", "lr", "twice"):
            assert row[key] == pytest.approx(sum(r[key] for r in rows) / 3, rel=1e-12), key
        assert row["skipped"] == 0.0
    assert epochs[0]["lr"] == pytest.approx(0.05)


def test_the_last_partial_log_window_becomes_a_train_row_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    straight = quiet_fit(make_state(), dataset(), max_steps=8, log_every=3)
    train = straight.history.rows["train"]
    assert [(r["step"], r.get("partial", False)) for r in train] == [
        (3, False),
        (6, False),
        (8, True),
    ]
    cut = quiet_fit(make_state(), dataset(), max_steps=7, log_every=3, checkpoint_dir=tmp_path)
    assert cut.history.rows["train"][-1]["step"] == 7 and cut.history.rows["train"][-1]["partial"]
    resumed = quiet_fit(
        make_state(), dataset(), max_steps=8, log_every=3, checkpoint_dir=tmp_path, resume=True
    )
    assert resumed.history.metrics_only() == straight.history.metrics_only()


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("memory", "columns"), [("host", {"memory_mib"}), ("device", {"memory_mib"}), ("none", set())]
)
def test_memory_columns_follow_the_memory_option(memory: str, columns: set[str]) -> None:
    result = quiet_fit(make_state(), dataset(), max_epochs=1, log_every=1, memory=memory)
    row = result.history.rows["train"][0]
    assert {k for k in row if "memory" in k} == columns  # no CUDA columns on a CPU state
    assert all(row[k] > 0 for k in columns)


def test_invalid_options_of_the_seeds_bullets_are_listed_together() -> None:
    with pytest.raises(ConfigError) as info:
        quiet_fit(
            make_state(),
            dataset(),
            max_epochs=1,
            stop_on_nonfinite="always",
            memory="gpu",
            grad_stats="layers",
            test_every_eval=1,
        )
    message = str(info.value)
    assert (
        "stop_on_nonfinite must be one of ['eval', 'train', 'none'], got stop_on_nonfinite='always'"
        in message
    )
    assert "memory must be one of ['host', 'device', 'none'], got memory='gpu'" in message
    assert "grad_stats must be one of [None, 'layer', 'param'], got grad_stats='layers'" in message
    assert "test_every_eval must be True or False, got test_every_eval=1" in message


# ---------------------------------------------------------------- device


def test_to_device_keeps_tensors_already_there_and_other_leaves() -> None:
    x, y = torch.ones(2, 3), torch.zeros(2, dtype=torch.int64)
    batch = {"x": x, "pair": (y, "label"), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert (
        moved["x"] is x
        and moved["pair"][0] is y
        and moved["pair"][1] == "label"
        and moved["n"] == 3
    )


def test_fit_on_the_states_device_trains_as_without_the_option() -> None:
    a = quiet_fit(make_state(), dataset(), max_epochs=1, device="cpu")
    b = quiet_fit(make_state(), dataset(), max_epochs=1)
    assert torch.equal(a.state.params["0.weight"], b.state.params["0.weight"])


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "meta",
            r"device='meta', but the state's tensors are on cpu: create the state from the "
            r"module on that device \(TrainState\.create\(module\.to\('meta'\)",
        ),
        (
            "gpu7",
            r"device must be a device such as 'cpu' or 'cuda:0' \(a str or torch\.device\), got "
            r"'gpu7'",
        ),
        (3, r"device must be a device such as 'cpu' or 'cuda:0' \(a str or torch\.device\), got 3"),
        pytest.param(
            "cuda",
            r"device='cuda' names a CUDA device, but CUDA is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_fit_refuses_a_device_the_state_is_not_on(device: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quiet_fit(make_state(), dataset(), max_epochs=1, device=device)


# ---------------------------------------------------------------- gradient statistics and transform
# metrics


def test_grad_stats_by_layer_are_the_norms_of_each_layers_gradients_and_updates() -> None:
    state = make_state(ft.sgd(0.1), grad_stats="layer")
    batch = next(iter(ft.Batcher(dataset(), BATCH, shuffle=False).epoch(0)))
    new, metrics = ft.train_step(state, batch)
    params = {k: p.detach().requires_grad_() for k, p in state.params.items()}
    grads = dict(
        zip(
            params,
            torch.autograd.grad(
                loss_fn(lambda x: torch.func.functional_call(state.module, params, (x,)), batch),
                list(params.values()),
            ),
            strict=True,
        )
    )
    for layer in ("0", "2"):
        names = [f"{layer}.weight", f"{layer}.bias"]
        expected = torch.linalg.vector_norm(torch.cat([grads[n].flatten() for n in names]))
        assert torch.allclose(metrics[f"grad_norm/{layer}"], expected, rtol=1e-6)
        step = torch.cat([(new.params[n] - state.params[n]).flatten() for n in names])
        weights = torch.cat([state.params[n].flatten() for n in names])
        assert torch.allclose(
            metrics[f"update_ratio/{layer}"], step.norm() / weights.norm(), rtol=1e-5
        )
    assert "grad_norm/0" not in ft.train_step(make_state(ft.sgd(0.1)), batch)[1]


def test_grad_stats_by_param_reach_the_history_through_fit() -> None:
    result = quiet_fit(make_state(), dataset(), max_epochs=1, log_every=3, grad_stats="param")
    row = result.history.rows["train"][0]
    assert {k for k in row if "/" in k} == {
        f"{m}/{n}"
        for m in ("grad_norm", "update_ratio")
        for n in ("0.weight", "0.bias", "2.weight", "2.bias")
    }
    assert result.history.rows["epoch"][0]["grad_norm/0.weight"] == row["grad_norm/0.weight"]


def test_grad_stats_are_computed_by_the_compiled_step_as_by_the_eager_one() -> None:
    state = make_state(grad_stats="layer")
    step = ft.compile_step(backend="aot_eager")  # the statistics traced into the graph
    for donate in (False, True):
        batch = tuple(t[:BATCH] for t in dataset().tensors)
        (_, eager), (_, compiled) = (
            ft.train_step(state, batch),
            step(state.clone() if donate else state, batch, donate=donate),
        )
        assert {k for k in compiled if "/" in k} == {
            f"{m}/{n}" for m in ("grad_norm", "update_ratio") for n in ("0", "2")
        }
        for k in eager:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=0, msg=k)


class CountState(NamedTuple):
    calls: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"calls": self.calls}


def count_calls() -> ft.Transform:
    """A custom transform: passes updates through and counts its calls, exposed as a metric."""

    def init_fn(params: Any) -> CountState:
        return CountState(torch.zeros((), dtype=torch.int64))

    def update_fn(updates: Any, state: CountState, params: Any = None) -> tuple[Any, CountState]:
        return updates, CountState(state.calls + 1)

    return ft.Transform(init_fn, update_fn)


def test_a_custom_transforms_metrics_reach_the_logs() -> None:
    state = make_state(ft.chain(count_calls(), ft.sgd(0.05)))
    result = quiet_fit(state, dataset(), max_epochs=2, log_every=3)
    assert [r["calls"] for r in result.history.rows["train"]] == [
        2.0,
        5.0,
    ]  # means of 1..3 and 4..6
    assert (
        "total_skipped" not in result.history.rows["train"][0]
    )  # the built-in wrappers' counters stay out


# ---------------------------------------------------------------- schedules in epochs


def test_a_per_epoch_schedule_gives_the_lr_of_a_torch_scheduler_stepped_each_epoch() -> None:
    from torch.optim.lr_scheduler import StepLR

    epochs, per_epoch = 5, N_SAMPLES // BATCH
    schedule = ft.schedules.per_epoch(
        ft.schedules.from_torch(StepLR, lr=0.1, step_size=2, gamma=0.5), steps_per_epoch=per_epoch
    )
    result = quiet_fit(make_state(ft.sgd(schedule)), dataset(), max_epochs=epochs, log_every=1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler, expected = StepLR(opt, step_size=2, gamma=0.5), []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert [r["lr"] for r in result.history.rows["epoch"]] == pytest.approx(expected, rel=1e-7)
    assert [r["lr"] for r in result.history.rows["train"]] == pytest.approx(
        [lr for lr in expected for _ in range(per_epoch)], rel=1e-7
    )


def test_per_epoch_checks_its_arguments() -> None:
    with pytest.raises(
        ConfigError,
        match=r"(?s)schedule must be a schedule \(callable\), got "
        r"schedule=0\.1.*steps_per_epoch must be > 0, got steps_per_epoch=0",
    ):
        ft.schedules.per_epoch(0.1, 0)


def test_create_rejects_an_unknown_grad_stats_grouping() -> None:
    with pytest.raises(
        ConfigError, match=r"grad_stats must be 'layer', 'param' or None, got grad_stats='module'"
    ):
        make_state(grad_stats="module")
