"""A checkpoint records the modules a run had in another mode than its model's (a BatchNorm frozen
by ``.eval()``), and a resume into a template whose modules' modes differ is refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import format as fmt
from functrain.checkpoint import state_io
from tests.models import loss_fn

N_BATCHES = 3


def make_model(frozen: bool) -> nn.Module:
    """3 -> 8 -> BatchNorm -> 1 from seed 0, its BatchNorm frozen (``set_bn_eval``) if `frozen`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    if frozen:
        set_bn_eval(model)
    return model


def set_bn_eval(model: nn.Module) -> None:
    """torchvision's references' freezing of BatchNorm statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()


def make_state(frozen: bool) -> ft.TrainState:
    return ft.TrainState.create(make_model(frozen), ft.adamw(1e-2), loss_fn)


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        x = torch.randn(6, 3, generator=gen) * 2 + 1
        out.append((x, x.sum(1, keepdim=True)))
    return out


def trained(frozen: bool, steps: int = 2) -> ft.TrainState:
    state = make_state(frozen)
    for batch in batches(0)[:steps]:
        state, _ = ft.train_step(state, batch)
    return state


def quiet_fit(state: ft.TrainState, **kwargs: Any) -> ft.FitResult:
    return ft.fit(
        state,
        batches(0),
        eval_data=batches(1),
        progress=False,
        verbosity="silent",
        **kwargs,
    )


def test_a_run_with_frozen_batchnorm_resumed_into_its_modes_trains_as_the_torch_loop(
    tmp_path: Path,
) -> None:
    # the torch loop: train mode with the BatchNorm frozen, evaluated in eval mode after each
    # epoch, then train mode and frozen again (torchvision's references)
    model = make_model(frozen=True)
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    for _ in range(4):
        model.train()
        set_bn_eval(model)
        for batch in batches(0):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            [loss_fn(model, batch) for batch in batches(1)]
    # functrain: two epochs, each saved after its evaluation; resumed into a template built as
    # the run was (its BatchNorm frozen) for two more
    quiet_fit(make_state(frozen=True), max_epochs=2, checkpoint_dir=tmp_path)
    for path in [*tmp_path.glob("ckpt-*"), *tmp_path.glob("best-*")]:
        # the modes it trained in, not its evaluation's
        assert ft.load(path)[1]["fingerprint"]["modes"] == {"1": "eval"}, path
    resumed = quiet_fit(
        make_state(frozen=True), max_epochs=4, checkpoint_dir=tmp_path, resume=True
    ).state
    assert int(resumed.step) == 4 * N_BATCHES
    for name, p in model.named_parameters():
        assert torch.equal(resumed.params[name], p), name
    for name, b in model.named_buffers():
        assert torch.equal(resumed.buffers[name], b), name
    assert torch.equal(resumed.buffers["1.running_mean"], torch.zeros(8))  # frozen throughout


def test_a_template_without_the_runs_frozen_batchnorm_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    path = ft.save(trained(frozen=True), tmp_path / "c")
    with pytest.raises(ft.StateMismatchError) as raised:
        ft.load(path, like=make_state(frozen=False))
    message = str(raised.value)
    assert "checkpoint has '1' eval, template has '1' train" in message
    assert "set_bn_eval" in message and ".eval() (or .train())" in message
    assert "optimizer" not in message  # (only the modes differ: no warm start suggested)
    # the manager's and fit's resume too, before a step
    quiet_fit(make_state(frozen=True), max_epochs=1, checkpoint_dir=tmp_path / "run")
    manager = ft.CheckpointManager(tmp_path / "run", best_metric="val_loss", readonly=True)
    with pytest.raises(ft.StateMismatchError, match="'1' eval"):
        manager.restore_latest(like=make_state(frozen=False))
    with pytest.raises(ft.StateMismatchError, match="'1' eval"):
        manager.restore_best(like=make_state(frozen=False))
    with pytest.raises(ft.StateMismatchError, match="'1' eval"):
        quiet_fit(
            make_state(frozen=False), max_epochs=2, checkpoint_dir=tmp_path / "run", resume=True
        )
    # the template in the run's modes loads; its weights alone load in any
    ft.load(path, like=make_state(frozen=True))
    warm = ft.load_weights(path, into=make_state(frozen=False))
    assert torch.equal(warm.params["0.weight"], ft.load(path)[0]["params"]["0.weight"])


def test_a_template_with_modules_in_eval_mode_the_run_trained_in_train_mode_is_refused(
    tmp_path: Path,
) -> None:
    path = ft.save(trained(frozen=False), tmp_path / "c")
    assert ft.load(path)[1]["fingerprint"]["modes"] == {}
    with pytest.raises(ft.StateMismatchError) as raised:
        ft.load(path, like=make_state(frozen=True))
    assert "checkpoint has '1' train, template has '1' eval" in str(raised.value)
    # a model in eval mode as a whole trains as one in train mode: no module's mode differs
    ft.load(
        path, like=ft.TrainState.create(make_model(frozen=False).eval(), ft.adamw(1e-2), loss_fn)
    )
    # a model in eval mode as a whole with a module in train mode (a pretrained model as loaded,
    # a new head added): its steps switch it all to train mode, which is what is recorded, so
    # it resumes into the same build with model.train() called, or without
    model = make_model(frozen=False).eval()
    model[1].train()
    headed = ft.save(ft.TrainState.create(model, ft.adamw(1e-2), loss_fn), tmp_path / "h")
    assert ft.load(headed)[1]["fingerprint"]["modes"] == {}
    for template in (make_model(False), make_model(False).eval()):
        ft.load(headed, like=ft.TrainState.create(template, ft.adamw(1e-2), loss_fn))


class KeepsFrozen(nn.Sequential):
    """A model whose ``train`` keeps its BatchNorm frozen (a detection backbone's override)."""

    def train(self, mode: bool = True) -> KeepsFrozen:
        super().train(mode)
        self[1].eval()
        return self


def test_a_model_in_eval_mode_whose_train_keeps_a_module_frozen_records_it(
    tmp_path: Path,
) -> None:
    # its steps run the override, which freezes the BatchNorm: the mode it trains in
    model = KeepsFrozen(*make_model(frozen=False)).eval()
    path = ft.save(ft.TrainState.create(model, ft.adamw(1e-2), loss_fn), tmp_path / "k")
    assert ft.load(path)[1]["fingerprint"]["modes"] == {"1": "eval"}
    assert not model.training and not model[1].training  # set back as it was
    with pytest.raises(ft.StateMismatchError, match="checkpoint has '1' eval, template has '1' t"):
        ft.load(path, like=ft.TrainState.create(make_model(False), ft.adamw(1e-2), loss_fn))


def test_a_checkpoint_written_before_modes_were_recorded_loads_into_either_template(
    tmp_path: Path,
) -> None:
    path = ft.save(trained(frozen=True), tmp_path / "c")
    tree, manifest = ft.load(path)
    old = {k: v for k, v in manifest["fingerprint"].items() if k != "modes"}
    fmt.write_tree(tmp_path / "old", tree, fingerprint=old, metadata=manifest["metadata"])
    for frozen in (True, False):
        restored = ft.load(tmp_path / "old", like=make_state(frozen))
        assert torch.equal(restored.params["0.weight"], tree["params"]["0.weight"])
    with pytest.raises(ft.StateMismatchError, match="'1' eval"):
        ft.load(path, like=make_state(frozen=False))  # where the record says otherwise


def test_a_stacked_states_checkpoint_records_and_checks_its_modes(tmp_path: Path) -> None:
    path = ft.save(ft.stack([trained(frozen=True), trained(frozen=True)]), tmp_path / "c")
    assert ft.load(path)[1]["fingerprint"]["modes"] == {"1": "eval"}
    with pytest.raises(ft.StateMismatchError, match="checkpoint has '1' eval"):
        ft.load(path, like=ft.stack([make_state(frozen=False), make_state(frozen=False)]))
    ft.load(path, like=ft.stack([make_state(frozen=True), make_state(frozen=True)]))


def test_a_save_beside_an_evaluation_in_another_thread_records_the_training_modes() -> None:
    # an evaluation switches the whole model to eval mode while it runs: a save of the state in
    # another thread meanwhile records the modes it trains in
    state = trained(frozen=True)
    started = threading.Event()
    recorded: list[dict[str, str]] = []

    def save_meanwhile() -> None:
        started.set()
        recorded.append(ft.fingerprint(state)["modes"])

    def eval_fn(model: Any, batch: Any) -> torch.Tensor:
        saver.start()
        started.wait()
        time.sleep(0.1)  # (the saver waits for the evaluation to end)
        return loss_fn(model, batch)

    saver = threading.Thread(target=save_meanwhile)
    ft.eval_step(state, batches(1)[0], eval_fn=eval_fn)
    saver.join()
    assert recorded == [{"1": "eval"}]


def test_a_save_a_donated_step_in_another_thread_waits_for_records_its_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the step waits for the save's hold of the state's tensors with the step lock held: the
    # save reads the modes without waiting for that lock
    state = trained(frozen=True)
    check = state_io.check_savable

    def step_meanwhile(s: ft.TrainState) -> None:
        stepper.start()
        time.sleep(0.2)  # (the step waits for the save by now)
        check(s)

    monkeypatch.setattr(state_io, "check_savable", step_meanwhile)
    saved: list[Path] = []
    stepper = threading.Thread(
        target=lambda: ft.train_step(state, batches(0)[2], donate=True), daemon=True
    )
    saver = threading.Thread(target=lambda: saved.append(ft.save(state, tmp_path / "c")))
    saver.daemon = True
    saver.start()
    saver.join(timeout=60)
    assert not saver.is_alive(), "the save waits for the step, which waits for the save"
    stepper.join(timeout=60)
    assert ft.load(saved[0])[1]["fingerprint"]["modes"] == {"1": "eval"}


def test_fit_evaluates_its_best_checkpoint_on_test_data_after_a_callback_froze_batchnorm(
    tmp_path: Path,
) -> None:
    # the best checkpoint was saved before the BatchNorm was frozen: its weights are evaluated
    # in the run's modes, as a torch loop's load_state_dict into its model would
    class FreezeAtSecondEpoch(ft.Callback):
        def on_epoch_begin(self, run: ft.Run) -> None:
            if int(run.state.epoch) == 1:
                set_bn_eval(run.state.module)

    result = quiet_fit(
        make_state(frozen=False),
        max_epochs=2,
        checkpoint_dir=tmp_path,
        test_data=batches(2),
        callbacks=[FreezeAtSecondEpoch()],
        mode="max",  # the first evaluation is the best
    )
    assert result.checkpoints["best"] is not None
    best = ft.load(result.checkpoints["best"])
    assert best[1]["fingerprint"]["modes"] == {}
    assert result.test is not None
    expected = ft.evaluate(
        ft.load_weights(result.checkpoints["best"], into=result.state), batches(2)
    )
    assert result.test == {"test_loss": expected["val_loss"]}
