"""A batch's samples as the state declares them (``TrainState.create(..., samples=fn)``): every
engine's ``samples_seen`` follows the declared count, each count counted by hand, where the first
dimension of the first tensor (the default, kept as it was) is no count of samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import functrain as ft
from tests.models import detection_batches, detection_loss, graph_batches, graph_loss

SIZES = [2, 5, 3, 4]  # images per batch


def images(batch: Any) -> int:
    """A detection batch's samples: its images."""
    return len(batch[0])


def graphs(batch: Any) -> int:
    """A graph batch's samples: its graphs (one class each)."""
    return batch[3].shape[0]


def detector(**options: Any) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), detection_loss, **options)


def run(state: ft.TrainState, batches: list[Any], step: Any = ft.train_step, **kw: Any) -> Any:
    for batch in batches:
        state, _ = step(state, batch, **kw)
    return state


@pytest.mark.parametrize("donate", [False, True])
def test_the_default_counts_a_detection_batch_by_its_first_images_channels(donate: bool) -> None:
    # the rule as it stands, its step's text as it was: the first tensor's first dimension, an
    # image's 3 channels; the declared count, the images
    default = run(detector(), detection_batches(SIZES), donate=donate)
    declared = run(detector(samples=images), detection_batches(SIZES), donate=donate)
    assert int(default.samples_seen) == 3 * len(SIZES)
    assert int(declared.samples_seen) == sum(SIZES)
    assert default.program.straight is not None and declared.program.straight is not None
    assert "counted_samples" not in default.program.straight.source
    assert "samples = first.shape[0]" in default.program.straight.source
    assert "first.shape[0]" not in declared.program.straight.source


@pytest.mark.parametrize(
    "engine",
    ["straight", "straight donated", "body", "accumulated", "compiled", "compiled donated"],
)
def test_every_engine_counts_the_images_a_detection_batch_declares(engine: str) -> None:
    options: dict[str, Any] = {"samples": images}
    if engine == "body":
        options["grad_stats"] = "layer"  # the body's update (`StepProgram.run`)
    if engine == "accumulated":
        options["accumulate_steps"] = 2
    step = ft.compile_step(backend="eager") if engine.startswith("compiled") else ft.train_step
    state = run(detector(**options), detection_batches(SIZES), step, donate="donated" in engine)
    assert int(state.samples_seen) == sum(SIZES)  # 14 images, counted by hand
    if engine.startswith("straight"):
        assert state.program.straight is not None
        assert "counted_samples(SAMPLES, batch)" in state.program.straight.source


def test_a_graph_batch_counts_the_graphs_it_declares_not_its_nodes() -> None:
    batches = graph_batches([3, 1, 4])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    default = run(ft.TrainState.create(model, ft.sgd(0.1), graph_loss), batches)
    declared = run(ft.TrainState.create(model, ft.sgd(0.1), graph_loss, samples=graphs), batches)
    assert int(default.samples_seen) == sum(b[0].shape[0] for b in batches)  # the nodes
    assert int(declared.samples_seen) == 3 + 1 + 4


def stacked(**options: Any) -> ft.TrainState:
    def member(k: int) -> ft.TrainState:
        torch.manual_seed(k)  # each member its own lambda, alike: stacked as one count
        return ft.TrainState.create(
            nn.Linear(3, 2),
            ft.sgd(0.1),
            detection_loss,
            seed=k,
            samples=lambda b: len(b[0]),
            **options,
        )

    return ft.stack([member(k) for k in range(2)])


def per_member(batch: Any) -> ft.PerMember:
    """Each member its own images of the batch's sizes (member 1's flipped), stacked."""
    ims, targets = batch
    return ft.PerMember(
        (tuple(torch.stack([im, im.flip(-1)]) for im in ims), targets_stacked(targets))
    )


def targets_stacked(targets: tuple) -> tuple:
    return tuple({k: torch.stack([v, v]) for k, v in t.items()} for t in targets)


@pytest.mark.parametrize("engine", ["planned", "accumulated", "compiled"])
@pytest.mark.parametrize("own", [False, True])
def test_a_stacked_state_counts_a_members_declared_samples(engine: str, own: bool) -> None:
    state = stacked(accumulate_steps=2) if engine == "accumulated" else stacked()
    step = ft.compile_step(backend="eager") if engine == "compiled" else ft.train_step
    batches = detection_batches(SIZES)
    state = run(state, [per_member(b) for b in batches] if own else batches, step)
    assert state.samples_seen.tolist() == [sum(SIZES)] * 2


def test_stacked_members_with_other_counts_are_refused() -> None:
    def member(k: int, samples: Any) -> ft.TrainState:
        torch.manual_seed(k)
        return ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), detection_loss, samples=samples)

    for other in (None, graphs):
        with pytest.raises(ft.ConfigError, match=r"member 1: its samples= differs from member 0"):
            ft.stack([member(0, images), member(1, other)])


@pytest.mark.parametrize(
    ("count", "got", "fix"),
    [
        (lambda b: True, "the bool True", "not a truth value"),
        (lambda b: -1, "-1, a negative number", "0 or more"),
        (lambda b: float(len(b[0])), "the float 2.0", r"return an int \(len"),
        (lambda b: torch.tensor(len(b[0])), r"a tensor \(Tensor\[\] torch.int64\)", "host sync"),
        (lambda b: "2", "a str", "return an int"),
    ],
)
@pytest.mark.parametrize("donate", [False, True])
def test_a_count_that_is_no_int_is_refused_at_the_first_step_leaving_the_state(
    count: Any, got: str, fix: str, donate: bool
) -> None:
    state = detector(samples=count)
    weights = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(
        ft.ConfigError, match=rf"samples=<lambda> .* must return .*got {got}: .*{fix}"
    ):
        ft.train_step(state, detection_batches(SIZES)[0], donate=donate)
    # nothing written (a donated state too): it steps again with a count that is one
    assert all(torch.equal(weights[k], v) for k, v in state.params.items())
    fixed = state.replace(options=attrs.evolve(state.options, samples=images))
    assert int(ft.train_step(fixed, detection_batches(SIZES)[0])[0].samples_seen) == 2


def test_a_numpy_integer_counts_and_what_is_no_function_is_refused_at_create() -> None:
    state = run(detector(samples=lambda b: np.int64(len(b[0]))), detection_batches(SIZES))
    assert int(state.samples_seen) == sum(SIZES)
    with pytest.raises(ft.ConfigError, match=r"got samples=8; to count every batch as 8, samples"):
        detector(samples=8)


def test_a_checkpoint_resumes_the_count_under_the_template_s_function(tmp_path: Path) -> None:
    batches = detection_batches(SIZES)
    saved = run(detector(samples=images), batches[:2])
    ft.save(saved, tmp_path / "ckpt")
    restored = ft.load(tmp_path / "ckpt", like=detector(samples=images))
    assert int(restored.samples_seen) == 2 + 5
    assert int(run(restored, batches[2:]).samples_seen) == sum(SIZES)


def test_a_checkpoint_of_a_declared_count_refuses_a_template_without_one(tmp_path: Path) -> None:
    # the template without samples= would count the rest of the run by the images' channels:
    # samples_seen and the evaluation weights of the resumed run would not be the run's
    ft.save(run(detector(samples=images), detection_batches(SIZES)[:2]), tmp_path / "declared")
    with pytest.raises(ft.StateMismatchError, match=r"samples='declared' in the checkpoint"):
        ft.load(tmp_path / "declared", like=detector())
    ft.save(run(detector(), detection_batches(SIZES)[:2]), tmp_path / "plain")
    with pytest.raises(ft.StateMismatchError, match=r"None in the checkpoint, 'declared'"):
        ft.load(tmp_path / "plain", like=detector(samples=images))
    assert int(ft.load(tmp_path / "plain", like=detector()).samples_seen) == 2 * 3
