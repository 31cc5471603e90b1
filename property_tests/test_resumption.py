"""The flagship property: a resumed run is bit for bit the run that was never interrupted.

For hypothesis-chosen run lengths, cut points and options, training ``n`` steps straight must equal
training ``k`` steps, saving with `functrain.save`, loading (in this process, or in a fresh one
running ``resume_worker.py``) and training the remaining ``n - k``: every leaf of the final state
tree and every per-step metric, compared by their bits (NaN included).

Mutation tests prove the check is not vacuous: a save that loses one piece of the state (the RNG,
a counter, the accumulation buffer, the EMA) makes it fail on an example where that piece matters.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.tree import leaves_by_path
from tests.processes import run_script

WORKER = Path(__file__).with_name("resume_worker.py")


def _import_worker() -> Any:
    spec = importlib.util.spec_from_file_location("resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _import_worker()

Spec = dict[str, Any]
Save = Callable[[ft.TrainState, Path], Any]
Resume = Callable[[Spec, Path, Path], tuple[Any, list[dict[str, torch.Tensor]]]]

OPTIMIZERS = ["adamw", "adamw_fused", "sgd_momentum", "sgd_dampening"] + (
    ["adam_schedule"] if importlib.util.find_spec("functrain.optim.schedules") else []
)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------- comparing bit for bit


def same_bits(a: Any, b: Any) -> bool:
    """Equal dtype, shape and bits (so NaN equals the same NaN); other leaves by value and type."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = _INT_OF_SIZE[a.element_size()]
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)


def leaf_mismatches(expected: Any, got: Any) -> list[str]:
    """Paths of every leaf that differs, is missing or is extra (NamedTuples and dicts alike)."""
    want, have = leaves_by_path(expected), leaves_by_path(got)
    problems = [f"missing {p}" for p in want if p not in have] + [
        f"extra {p}" for p in have if p not in want
    ]
    problems += [f"differs {p}" for p in want if p in have and not same_bits(want[p], have[p])]
    return problems


# ---------------------------------------------------------------- the runs


def resume_in_process(
    spec: Spec, checkpoint: Path, workdir: Path
) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    template = worker.build_state(spec, init_seed=spec["seed"] + 1)
    state, metrics = worker.train(ft.load(checkpoint, like=template), spec, spec["k"], spec["n"])
    return state.tree(), metrics


def resume_in_fresh_process(
    spec: Spec, checkpoint: Path, workdir: Path
) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    spec_file, output = workdir / "spec.json", workdir / "resumed"
    spec_file.write_text(json.dumps({**spec, "threads": torch.get_num_threads()}))
    done = run_script(WORKER, str(spec_file), str(checkpoint), str(output))
    assert done.returncode == 0, f"resume worker failed:\n{done.stderr}"
    tree, _ = ft.load(output)
    return tree["state"], tree["metrics"]


def resumption_mismatches(spec: Spec, resume: Resume, save: Save = ft.save) -> list[str]:
    """Train n steps straight, and k + resumed n - k; return every leaf where the two differ."""
    state = worker.build_state(spec, init_seed=spec["seed"])
    at_k, first = worker.train(state, spec, 0, spec["k"])
    final, rest = worker.train(at_k, spec, spec["k"], spec["n"])
    window = spec["accumulate_steps"]
    for i in spec["nan_steps"]:  # the injected batches really skip the update of their window
        end = (i // window + 1) * window - 1
        if end < spec["n"]:
            assert bool(((first + rest)[end]["skipped"] == 1.0).all()), (
                f"the window ending at batch {end} has a NaN batch ({i}) but was not skipped"
            )
    with tempfile.TemporaryDirectory() as tmp:
        save(at_k, Path(tmp) / "ckpt")
        got_state, got_metrics = resume(spec, Path(tmp) / "ckpt", Path(tmp))
    return leaf_mismatches(
        {"state": final.tree(), "metrics": rest}, {"state": got_state, "metrics": got_metrics}
    )


# ---------------------------------------------------------------- the property


@st.composite
def run_specs(draw: st.DrawFn) -> Spec:
    accumulate_steps = draw(st.integers(1, 3))
    n = draw(st.integers(2, 12))
    k = draw(st.integers(1, n - 1))
    if accumulate_steps > 1 and draw(st.booleans()):
        # cut inside an accumulation window: the buffer and the window position must survive
        k = draw(st.sampled_from([j for j in range(1, n) if j % accumulate_steps]))
    return {
        "seed": draw(st.integers(0, 2**20)),
        "n": n,
        "k": k,
        "accumulate_steps": accumulate_steps,
        "ema_decay": draw(st.sampled_from([None, 0.9])),
        "dropout": draw(st.booleans()),
        "batchnorm": draw(st.booleans()),
        "precision": draw(st.sampled_from(["fp32", "bf16"])),
        "clip_grad_norm": draw(st.sampled_from([None, 0.5])),
        "nan_steps": sorted(draw(st.sets(st.integers(0, n - 1), max_size=3))),
        "optimizer": draw(st.sampled_from(OPTIMIZERS)),
    }


@settings(deadline=None)
@given(spec=run_specs())
def test_resumed_run_equals_straight_run_after_load_in_process(spec: Spec) -> None:
    note(f"spec={spec}")
    assert resumption_mismatches(spec, resume_in_process) == []


EVERYTHING_ON = {
    "seed": 3,
    "n": 11,
    "k": 7,  # one micro-batch into the third window
    "accumulate_steps": 3,
    "ema_decay": 0.9,
    "dropout": True,
    "batchnorm": True,
    "precision": "bf16",
    "clip_grad_norm": 0.5,
    "nan_steps": [2, 8],
    "optimizer": OPTIMIZERS[-1],
}


# a fresh Python process per example costs seconds (torch import): few examples in CI
@settings(deadline=None, max_examples=min(7, settings.default.max_examples))
@given(spec=run_specs())
@example(spec=EVERYTHING_ON)
def test_resumed_run_equals_straight_run_after_load_in_fresh_process(spec: Spec) -> None:
    note(f"spec={spec}")
    assert resumption_mismatches(spec, resume_in_fresh_process) == []


# ---------------------------------------------------------------- stacked states (functrain.stack)


@st.composite
def stacked_specs(draw: st.DrawFn) -> Spec:
    spec = {**draw(run_specs()), "members": draw(st.integers(1, 3))}
    # stack refuses BatchNorm under autocast (torch's vmap rule for batch_norm fails there)
    return {**spec, "precision": "fp32"} if spec["batchnorm"] else spec


@settings(deadline=None, max_examples=min(2, settings.default.max_examples))
@given(spec=stacked_specs())
@example(spec={**EVERYTHING_ON, "precision": "fp32", "members": 3})
def test_resumed_stacked_run_equals_straight_stacked_run_in_fresh_process(spec: Spec) -> None:
    note(f"spec={spec}")
    assert resumption_mismatches(spec, resume_in_fresh_process) == []


def test_stacked_resumption_check_detects_a_checkpoint_that_loses_the_rng() -> None:
    spec = _spec(dropout=True, members=2)
    assert resumption_mismatches(spec, resume_in_process) == []
    assert "differs state/rng" in resumption_mismatches(
        spec, resume_in_process, save=save_without(spec, lambda p: p == "rng")
    )


# ---------------------------------------------------------------- the check is not vacuous


def _spec(**changes: Any) -> Spec:
    base = {
        "seed": 7,
        "n": 7,
        "k": 4,
        "accumulate_steps": 1,
        "ema_decay": None,
        "dropout": False,
        "batchnorm": False,
        "precision": "fp32",
        "clip_grad_norm": None,
        "nan_steps": [],
        "optimizer": "adamw",
    }
    return {**base, **changes}


def save_without(spec: Spec, lost: Callable[[str], bool]) -> Save:
    """A broken `ft.save`: leaves whose path `lost` selects come back as the initial values."""
    initial = leaves_by_path(worker.build_state(spec, init_seed=spec["seed"]).tree())

    def save(state: ft.TrainState, path: Path) -> Any:
        tree = state.tree()
        flat, structure = pytree.tree_flatten(tree)
        paths = list(leaves_by_path(tree))
        assert any(lost(p) for p in paths), "the mutation selects no leaf"
        kept = [initial[p] if lost(p) else leaf for p, leaf in zip(paths, flat, strict=True)]
        return ft.save(state.with_tree(pytree.tree_unflatten(kept, structure)), path)

    return save


# with k = 4 and accumulate_steps = 3 the cut lies one micro-batch into a window
MUTATIONS = {
    "rng": (_spec(dropout=True), lambda p: p == "rng"),
    "step": (_spec(), lambda p: p == "step"),
    "micro_step": (_spec(n=6, accumulate_steps=3, ema_decay=0.9), lambda p: p == "micro_step"),
    "accumulator_micro_step": (
        _spec(accumulate_steps=3),
        lambda p: p.startswith("opt_state/") and p.endswith("/micro_step"),
    ),
    "grad_sum": (_spec(accumulate_steps=3), lambda p: "/grad_sum/" in p),
    "ema_state": (_spec(ema_decay=0.9), lambda p: p.startswith("ema_state/")),
}


# counters left disagreeing with the others: `save` refuses the state before a resume can differ
REFUSED = {"step", "micro_step", "accumulator_micro_step"}


@pytest.mark.parametrize("lost", sorted(MUTATIONS))
def test_resumption_check_detects_a_checkpoint_that_loses(lost: str) -> None:
    spec, selects = MUTATIONS[lost]
    assert resumption_mismatches(spec, resume_in_process) == []
    broken = save_without(spec, selects)
    if lost in REFUSED:
        with pytest.raises(ft.ConfigError, match="cannot save this state: a load would refuse"):
            resumption_mismatches(spec, resume_in_process, save=broken)
    else:
        assert resumption_mismatches(spec, resume_in_process, save=broken) != []


def test_resumption_check_in_fresh_process_detects_a_checkpoint_that_loses_the_rng() -> None:
    spec, selects = MUTATIONS["rng"]
    problems = resumption_mismatches(
        spec, resume_in_fresh_process, save=save_without(spec, selects)
    )
    assert "differs state/rng" in problems
    assert any(p.startswith("differs metrics/") for p in problems)
