"""`fit` and `evaluate` count a batch's samples as the state declares them (``samples=``): the
evaluation's means weighted by them, an empty batch (0 of them) skipped, ``samples_seen`` across a
resume; each against a hand computation over the declared samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from tests.driver.runs import quiet_fit
from tests.models import detection_batches, detection_loss, graph_batches, graph_loss

TRAIN, VAL = [3, 5, 2], [1, 4, 2]  # images per batch


def images(batch: Any) -> int:
    return len(batch[0])


def graphs(batch: Any) -> int:
    return batch[3].shape[0]


def state_of(loss: Any, seed: int = 0, **options: Any) -> ft.TrainState:
    torch.manual_seed(seed)
    return ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), loss, seed=seed, **options)


def hand_means(
    module: nn.Module, loss: Any, batches: list[Any], counts: list[int]
) -> dict[str, float]:
    """Each metric's mean over `batches` weighted by `counts` (float64), `module` in eval mode."""
    module.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch, n in zip(batches, counts, strict=True):
            out = loss(module, batch)
            value, metrics = out if isinstance(out, tuple) else (out, {})
            for k, v in {"loss": value, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.double()) * n
    return {f"val_{k}": v / sum(counts) for k, v in sums.items()}


def test_a_detection_runs_evaluation_is_the_mean_over_its_images() -> None:
    train, val = detection_batches(TRAIN), detection_batches(VAL, seed=1)
    result = quiet_fit(state_of(detection_loss, samples=images), train, eval_data=val, max_epochs=2)
    assert int(result.state.samples_seen) == 2 * sum(TRAIN)
    got = result.history.rows["eval"][-1]["val_loss"]
    expected = hand_means(result.module, detection_loss, val, VAL)["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6)
    # the default weighs each batch by its first image's 3 channels: the batches' plain mean
    plain = quiet_fit(state_of(detection_loss), train, eval_data=val, max_epochs=2)
    assert int(plain.state.samples_seen) == 2 * 3 * len(TRAIN)
    assert plain.history.rows["eval"][-1]["val_loss"] == pytest.approx(
        hand_means(plain.module, detection_loss, val, [3] * len(VAL))["val_loss"], rel=1e-6
    )


def test_a_graph_runs_accuracy_is_the_accuracy_over_its_graphs() -> None:
    train, val = graph_batches([4, 6]), graph_batches([2, 7, 3], seed=1)
    state = ft.fit(
        state_of(graph_loss, samples=graphs),
        train,
        max_epochs=3,
        progress=False,
        verbosity="silent",
    ).state
    got = ft.evaluate(state, val)
    expected = hand_means(state.export_module(), graph_loss, val, [2, 7, 3])
    assert got == pytest.approx(expected, rel=1e-6)
    assert int(state.samples_seen) == 3 * (4 + 6)


def test_a_batch_that_declares_no_samples_is_skipped_in_training_and_evaluation() -> None:
    train = detection_batches([3, 0, 2])  # torchvision's collate of no images: ((), ())
    val = detection_batches([2, 0, 4], seed=1)
    with pytest.warns(RuntimeWarning, match="skipping an empty batch at epoch 0, position 1"):
        result = quiet_fit(state_of(detection_loss, samples=images), train, max_epochs=1)
    assert result.empty_batches == 1 and int(result.state.step) == 2
    assert int(result.state.samples_seen) == 5
    got = ft.evaluate(result.state, val)["val_loss"]
    kept = [val[0], val[2]]
    assert got == pytest.approx(hand_means(result.module, detection_loss, kept, [2, 4])["val_loss"])
    with pytest.raises(ft.ConfigError, match="train_data's 2 batches all hold 0 samples"):
        quiet_fit(state_of(detection_loss, samples=images), [train[1]] * 2, max_epochs=1)


def test_a_resumed_run_with_the_same_count_continues_it(tmp_path: Path) -> None:
    train, val = detection_batches(TRAIN), detection_batches(VAL, seed=1)
    run = dict(eval_data=val, checkpoint_dir=tmp_path, save_every=1)
    quiet_fit(state_of(detection_loss, samples=images), train, max_epochs=1, **run)
    resumed = quiet_fit(
        state_of(detection_loss, samples=images), train, max_epochs=2, resume=True, **run
    )
    assert int(resumed.state.samples_seen) == 2 * sum(TRAIN)
    expected = hand_means(resumed.module, detection_loss, val, VAL)["val_loss"]
    assert resumed.history.rows["eval"][-1]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_stacked_runs_evaluation_weighs_each_members_batches_by_their_images() -> None:
    train, val = detection_batches(TRAIN), detection_batches(VAL, seed=1)
    members = ft.stack([state_of(detection_loss, seed=k, samples=images) for k in range(2)])
    result = quiet_fit(members, train, eval_data=val, max_epochs=1)
    assert result.state.samples_seen.tolist() == [sum(TRAIN)] * 2
    row = result.history.rows["eval"][-1]
    for k, member in enumerate(ft.unstack(result.state)):
        expected = hand_means(member.export_module(), detection_loss, val, VAL)["val_loss"]
        assert row[f"val_loss[{k}]"] == pytest.approx(expected, rel=1e-5)
