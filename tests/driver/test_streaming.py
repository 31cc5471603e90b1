"""Training data with ``state_dict()`` / ``load_state_dict()`` resumes from its saved state: no
replay."""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.distributed import DistConfig
from functrain.driver.data import StatefulSource, storable_state
from functrain.driver.ledger import tree_problems
from tests.driver.runs import interrupted_at
from tests.processes import run_script

WORKER = Path(__file__).parent / "workers" / "stream_worker.py"
sys.path.insert(0, str(WORKER.parent))
import stream_worker as worker  # noqa: E402  (not `worker`: tests/distributed/workers has one)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


def launch(spec: dict[str, Any]) -> None:
    done = run_script(WORKER, json.dumps(spec), timeout=240, OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def batch_ids(num_workers: int, batches: int) -> list[list[int]]:
    """The sample ids of the first `batches` batches the loader yields, epoch after epoch."""
    out: list[list[int]] = []
    source = worker.loader(None, num_workers)
    while len(out) < batches:
        for x, _ in source:
            out.append([int(round(v)) for v in _ids_of(x)])
    return out[:batches]


def _ids_of(x: torch.Tensor) -> list[float]:
    # sample(i)'s first feature is sin(i + 1): find i among the stream's ids
    table = torch.stack([worker.sample(i)[0][0] for i in range(worker.SAMPLES)])
    return [float((table == v).nonzero()[0, 0]) for v in x[:, 0]]


def reads(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


# (num_workers, accumulate_steps, save_every, async_save, how the first run ends)
CASES = {
    "in-process loading, interrupted mid-epoch": (0, 1, 4, False, {"interrupt_at": 10}),
    "two workers, accumulation, async saves, interrupted mid-epoch": (
        2,
        2,
        2,
        True,
        {"interrupt_at": 5},
    ),
    "two workers, stopped by max_steps mid-epoch": (2, 1, None, False, {"max_steps": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_resumed_in_a_new_process_reads_no_consumed_sample_again_and_ends_bit_identical(
    tmp_path: Path, case: str
) -> None:
    pytest.importorskip("torchdata")  # the [data] extra; `make test` installs it
    num_workers, accumulate, save_every, async_save, first_end = CASES[case]
    max_steps = 18 // accumulate  # 3 epochs of 6 batches
    spec = {
        "num_workers": num_workers,
        "accumulate": accumulate,
        "save_every": save_every,
        "async_save": async_save,
        "max_steps": max_steps,
    }
    straight = worker.run({**spec, "log": None, "checkpoint_dir": str(tmp_path / "straight")})

    ckpt = tmp_path / "ckpt"
    first = {**spec, "log": str(tmp_path / "first.log"), "checkpoint_dir": str(ckpt), **first_end}
    if "interrupt_at" in first_end:
        with pytest.raises(worker.Interrupted):
            worker.run(first)
    else:
        worker.run(first)
    saved_step = int(ft.load(ft.CheckpointManager(ckpt, readonly=True).latest())[0]["step"])
    assert 0 < saved_step < max_steps
    consumed = saved_step * accumulate  # batches the saved steps consumed

    resumed_log = tmp_path / "resumed.log"
    launch(
        {
            **spec,
            "log": str(resumed_log),
            "checkpoint_dir": str(ckpt),
            "out": str(tmp_path / "resumed"),
            "resume": True,
        }
    )
    order = batch_ids(num_workers, 18)
    # the run ends at an epoch's end, so no worker prefetched past it: the resumed process read
    # exactly the samples of the batches after the checkpoint, none of those before
    assert Counter(reads(resumed_log)) == Counter(i for batch in order[consumed:] for i in batch)
    resumed = ft.load(tmp_path / "resumed", like=worker.build_state(accumulate))
    ft.testing.assert_states_equal(straight.state.tree(), resumed.tree(), ignore=["driver"])
    assert int(resumed.step) == max_steps


class Stream:
    """A user's own stateful source: batches of ids ``0 .. 11``, every read recorded in `reads`."""

    def __init__(self, reads: list[int], size: int = 12) -> None:
        self.reads, self.size, self.next = reads, size, 0

    def __iter__(self) -> Any:
        while self.next < self.size:
            i = self.next
            self.next += 2
            self.reads += [i, i + 1]
            yield torch.tensor([[float(i)], [float(i + 1)]]), torch.tensor([[1.0], [2.0]])
        self.next = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next, "tag": ("stream", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["tag"] == ("stream", None)  # tuples and None come back as they were
        self.next = state["next"]


def linear_state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(1, 1)
    return ft.TrainState.create(
        module, ft.sgd(0.01), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
    )


def fit_stream(source: Any, tmp_path: Path, max_steps: int, **kw: Any) -> ft.FitResult:
    return ft.fit(
        linear_state(),
        source,
        max_steps=max_steps,
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
        verbosity="silent",
        **kw,
    )


def test_a_users_stateful_source_resumes_from_its_saved_state(tmp_path: Path) -> None:
    straight = ft.fit(linear_state(), Stream([]), max_steps=10, progress=False, verbosity="silent")
    first: list[int] = []
    fit_stream(Stream(first), tmp_path, 4)  # stops mid-epoch (6 batches an epoch)
    assert first == list(range(8))
    second: list[int] = []
    result = fit_stream(Stream(second), tmp_path, 10, resume=True)
    assert second == [*range(8, 12), *range(8)]  # the epoch's last 2 batches, then 4 of the next
    ft.testing.assert_states_equal(straight.state.tree(), result.state.tree(), ignore=["driver"])
    assert result.state.driver["source"] == {"ranks": [{"next": 8, "tag": ("stream", None)}]}


def test_a_ctrl_c_inside_a_step_saves_no_state_past_the_batch_it_drew(tmp_path: Path) -> None:
    # the source's state is past the batch the interrupted step drew, which no step consumed:
    # nothing is saved, and the resume goes on from the last checkpoint, reading that batch
    interrupted_at_five = interrupted_at(
        5, lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1])
    )
    straight = ft.fit(linear_state(), Stream([]), max_steps=10, progress=False, verbosity="silent")
    state = ft.TrainState.create(linear_state().export_module(), ft.sgd(0.01), interrupted_at_five)
    first = ft.fit(
        state,
        Stream([]),
        max_steps=10,
        save_every=3,
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
        verbosity="silent",
    )
    assert first.stop_reason == "interrupted" and int(first.state.step) == 4
    assert first.checkpoints["latest"].name.startswith("ckpt-000000003")
    second: list[int] = []
    result = fit_stream(Stream(second), tmp_path, 10, save_every=3, resume=True)
    assert second[:4] == [6, 7, 8, 9]  # from the checkpoint, the batch the interrupt drew too
    ft.testing.assert_states_equal(straight.state.tree(), result.state.tree(), ignore=["driver"])


def test_a_resume_at_an_epoch_end_starts_the_next_pass_from_the_saved_state(tmp_path: Path) -> None:
    fit_stream(Stream([]), tmp_path, 6)  # the epoch's last update: the source's pass is over
    second: list[int] = []
    fit_stream(Stream(second), tmp_path, 9, resume=True)
    assert second == list(range(6))


def test_an_early_stopped_run_saves_the_state_after_its_last_consumed_batch(tmp_path: Path) -> None:
    reads_: list[int] = []
    val = [(torch.tensor([[3.0]]), torch.tensor([[1.0]]))]
    early = {"target": "val_loss", "patience": 2, "mode": "max"}  # stops once the loss stops rising
    result = fit_stream(
        Stream(reads_),
        tmp_path,
        50,
        eval_data=val,
        run_mode="step",
        early_stopping=early,
        best_metric="val_loss",
        mode="max",
    )
    step = int(result.state.step)
    assert result.stop_reason == "early_stopping" and step % 6  # mid-epoch
    assert len(reads_) == 2 * step  # read in this process: exactly the consumed batches
    latest = ft.CheckpointManager(tmp_path / "ckpt", readonly=True).latest()
    saved = ft.load(latest, like=linear_state()).driver["source"]
    assert saved == {"ranks": [{"next": 2 * step % 12, "tag": ("stream", None)}]}


class Unstorable(Stream):
    def __init__(self, reads: list[int], bad: Any) -> None:
        super().__init__(reads)
        self.bad = bad

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next, "shards": {"done": self.bad}}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({1, 2}, r"\['shards'\]\['done'\] is a set"),
        ({3: "x"}, r"\['shards'\]\['done'\]\[3\] is under a key of type int"),
        (torch.zeros(2).numpy(), r"\['shards'\]\['done'\] is a numpy.ndarray"),
    ],
)
def test_a_state_a_checkpoint_cannot_store_is_refused_before_the_first_step_naming_it(
    tmp_path: Path, bad: Any, named: str
) -> None:
    reads_: list[int] = []
    with pytest.raises(
        ft.ConfigError, match=r"train_data.state_dict\(\) \(Unstorable\)" + named + ".*never pickle"
    ):
        fit_stream(Unstorable(reads_, bad), tmp_path, 2)
    assert reads_ == []


def test_an_iterable_source_given_explicitly_resumes_by_replay_despite_a_state_dict(
    tmp_path: Path,
) -> None:
    fit_stream(ft.IterableSource(Unstorable([], {1})), tmp_path, 2)  # the state is never asked for
    again: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replayed batches are those consumed: no warning
        fit_stream(ft.IterableSource(Unstorable(again, {1})), tmp_path, 3, resume=True)
    assert again == list(range(6))


def test_without_a_checkpoint_dir_the_state_is_neither_checked_nor_stored() -> None:
    result = ft.fit(
        linear_state(), Unstorable([], {1}), max_steps=2, progress=False, verbosity="silent"
    )
    assert "source" not in result.state.driver


@pytest.mark.parametrize("same_object", [True, False])
def test_a_second_fit_of_a_state_stopped_mid_epoch_goes_on_from_its_streams_state(
    same_object: bool,
) -> None:
    # a notebook's fit(max_steps=4), then fit(result.state, ...): no checkpoint, and the stream's
    # state handed on in the state, loaded, not replayed (which would skip the live stream's next
    # batches, or read the consumed ones again)
    straight = ft.fit(linear_state(), Stream([]), max_steps=10, progress=False, verbosity="silent")
    first: list[int] = []
    stream = Stream(first)
    stopped = ft.fit(linear_state(), stream, max_steps=4, progress=False, verbosity="silent")
    second: list[int] = first if same_object else []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no replay's warning
        result = ft.fit(
            stopped.state,
            stream if same_object else Stream(second),
            max_steps=10,
            progress=False,
            verbosity="silent",
        )
    read = second[8:] if same_object else second
    assert read == [*range(8, 12), *range(8)]  # the epoch's last 2 batches, then 4 of the next
    ft.testing.assert_states_equal(straight.state.tree(), result.state.tree(), ignore=["driver"])


class Renamed(Stream):
    """A stream of another kind: its state under another key."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next = state["position"]


def test_a_state_holding_another_kind_of_streams_position_is_refused_naming_the_load_error() -> (
    None
):
    stopped = ft.fit(linear_state(), Stream([]), max_steps=4, progress=False, verbosity="silent")
    with pytest.raises(ft.ConfigError, match=r"load_state_dict\(\) \(Renamed\).*KeyError"):
        ft.fit(stopped.state, Renamed([]), max_steps=10, progress=False, verbosity="silent")


def test_the_stored_state_is_a_copy_later_changes_to_the_source_cannot_reach() -> None:
    position = torch.zeros(1)
    saved = storable_state({"pos": position, "order": [1, 2]})
    position += 1
    assert saved["pos"].tolist() == [0.0] and saved["pos"].data_ptr() != position.data_ptr()


def test_a_checkpoint_without_the_sources_state_falls_back_to_replay_with_a_warning(
    tmp_path: Path,
) -> None:
    plain: list[int] = []

    class Plain:  # the same batches, no state_dict: the checkpoint holds no state of it
        def __iter__(self) -> Any:
            return iter(Stream(plain))

    fit_stream(Plain(), tmp_path, 2)
    again: list[int] = []
    with pytest.warns(
        RuntimeWarning,
        match="replaying and skipping 2 consumed batches; the checkpoint holds no state of this",
    ):
        fit_stream(Stream(again), tmp_path, 4, resume=True)
    assert again == list(range(8))  # the 2 consumed batches were read again


def test_a_plain_iterable_resumes_by_replay_warning_only_when_the_batches_differ(
    tmp_path: Path,
) -> None:
    reads_: list[int] = []

    class Plain:
        def __iter__(self) -> Any:
            return iter(Stream(reads_))

    fit_stream(Plain(), tmp_path, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same batches replayed
        fit_stream(Plain(), tmp_path, 3, resume=True)


def test_each_rank_resumes_its_own_state_and_another_world_size_is_refused() -> None:
    saved = {"ranks": [{"next": 2, "tag": ("stream", None)}, {"next": 6, "tag": ("stream", None)}]}
    source = StatefulSource(Stream([]))
    source.resume(saved, DistConfig(world_size=2, rank=1))
    assert source.source.next == 6 and source.state_tree()["next"] == 6
    with pytest.raises(
        ft.ConfigError, match=r"position on 2 rank\(s\), this run has 1: .*resume on 2 rank\(s\)"
    ):
        StatefulSource(Stream([])).resume(saved, None)


def test_a_malformed_saved_source_state_is_named_by_the_checkpoint_check() -> None:
    assert tree_problems({"source": {"ranks": []}}) == [
        "driver/source: expected None or a dict {'ranks': [one data state per rank]}, got dict "
        "{'ranks': []}"
    ]
    assert tree_problems({"source": {"ranks": [{"next": 2}]}}) == []
