"""Where functrain's collectives run: the device each process group's backend takes.

There is no GPU here, so NCCL's case (a backend that takes CUDA tensors alone) is a backend
registered for ``cuda`` only, and the runs record every collective functrain issues through
``torch.distributed`` together with the function that issued it: each must have asked
`collective_device` for its group (the step's own collectives run on the state's tensors instead).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.futures import Future

import functrain as ft
import functrain.distributed as ftd
from functrain.distributed import data_parallel

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _done(result: Any) -> Any:
    future: Future[Any] = Future()
    future.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(future)


class OneProcessGroup(dist.ProcessGroup):
    """A group of `world` ranks in this one process: each collective completes at once, as if
    every rank held this one's values (a sum is this rank's value, a gather `world` copies)."""

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return _done(tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts=None):
        for out in outputs[0]:
            out.copy_(inputs[0])
        return _done(outputs)

    def barrier(self, opts: Any = None) -> Any:
        return _done(None)

    def getBackendName(self) -> str:
        return "one_process"


def _one_process(store: Any, rank: int, world: int, timeout: timedelta) -> OneProcessGroup:
    return OneProcessGroup(rank, world)


def _torch_fake(*args: Any) -> Any:
    # torch's own fake backend (C++): its groups register per device type, as gloo's and NCCL's do
    from torch.testing._internal.distributed.fake_pg import _create_fake_pg

    return _create_fake_pg(*args)


# several ranks in this one process; and NCCL's case on a CPU machine: backends taking CUDA alone
dist.Backend.register_backend("one_process", _one_process, devices=["cpu"])
dist.Backend.register_backend("one_process_cuda", _one_process, devices=["cuda"])
dist.Backend.register_backend("fake_cuda", _torch_fake, extended_api=True, devices=["cuda"])


@pytest.fixture
def group(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The default group, of the backend and world size `request.param` names."""
    backend, world = request.param
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=world)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "group",
    [("gloo", 1), ("cpu:gloo,cuda:fake_cuda", 1), ("one_process", 2)],
    ids=["gloo", "cpu-gloo-cuda-other", "registered-for-cpu"],
    indirect=True,
)
def test_collective_device_is_the_cpu_where_the_backend_takes_it(group: Any) -> None:
    assert "cpu" in ftd.backend.backend_devices(group)
    assert ftd.collective_device(group) == torch.device("cpu")
    assert ftd.collective_device() == torch.device("cpu")  # the default group's


@pytest.mark.parametrize(
    "group",
    [("fake_cuda", 1), ("one_process_cuda", 2)],
    ids=["registered-per-device", "registered-in-python"],
    indirect=True,
)
def test_collective_device_is_the_current_cuda_device_where_the_backend_takes_only_cuda(
    group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no GPU here: the device this process would have set with torch.cuda.set_device(3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ftd.backend.backend_devices(group) == ("cuda",)
    assert ftd.collective_device(group) == torch.device("cuda", 3)


@pytest.mark.parametrize("group", [("fake_cuda", 1)], indirect=True)
def test_collective_device_is_the_device_the_group_is_bound_to_before_the_current_one(
    group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # never set: cuda:0 everywhere
    monkeypatch.setattr(group, "bound_device_id", torch.device("cuda", 2), raising=False)
    assert ftd.collective_device(group) == torch.device("cuda", 2)


@pytest.mark.parametrize("group", [("fake_cuda", 2)], indirect=True)
def test_a_state_on_a_device_the_backend_does_not_take_is_refused_before_any_collective(
    group: Any,
) -> None:
    # NCCL's case: what every rank's creation check used to send it, a CPU tensor, it refuses
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1), group=group)
    with pytest.raises(
        ft.ConfigError,
        match=r"backend 'fake_cuda' takes cuda tensors, got a state on cpu: .* move the module to "
        r"cuda before TrainState.create",
    ):
        ft.TrainState.create(nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())


# ---------------------------------------------------------------------------------------------
# every collective functrain issues, recorded with the function that issued it


@attrs.frozen
class Collective:
    name: str
    issuer: FrameType  # the functrain function that called torch.distributed
    devices: tuple[torch.device, ...]


# the step's collectives: on the state's own tensors, where it lives (create checks that the
# backend takes its device), never moved for the collective
ON_THE_STATES_TENSORS = {"all_reduce_mean", "all_gather"}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Collective], list[Any]]]:
    """Every collective functrain calls in torch.distributed, and each `collective_device` asked.

    A collective is recorded with the functrain frame that called it; an answer of
    `collective_device` as ``(frame that asked, group, device)``.
    """
    collectives: list[Collective] = []
    asked: list[Any] = []
    names = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "barrier")
    for name in (*names, *(["all_gather_single"] if hasattr(dist, "all_gather_single") else [])):
        original = getattr(dist, name)

        def recording(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("functrain."):
                devices = tuple(t.device for t in _tensors([*args, *kw.values()]))
                collectives.append(Collective(_name, caller, devices))
            return _original(*args, **kw)

        monkeypatch.setattr(dist, name, recording)
    answer = getattr(data_parallel, "collective_device", None)

    def asking(group: Any = None) -> torch.device:
        assert answer is not None
        device = answer(group)
        asked.append((sys._getframe(1), group, device))
        return device

    # raising=False: the primitives look it up in their module, where the function must be used
    monkeypatch.setattr(data_parallel, "collective_device", asking, raising=False)
    yield collectives, asked
    collectives.clear()
    asked.clear()


def _unrouted(collectives: list[Collective], asked: list[Any]) -> list[str]:
    """The collectives of host values that ran where the function issuing them did not ask."""
    unrouted = []
    for c in collectives:
        if c.issuer.f_code.co_name in ON_THE_STATES_TENSORS:
            continue
        answers = [device for frame, _, device in asked if frame is c.issuer]
        if not answers or any(d != answers[-1] for d in c.devices):
            unrouted.append(f"{c.name} in {c.issuer.f_code.co_name} on {list(c.devices)}")
    return unrouted


class Stream:
    """This rank's stream of batches, with a position a checkpoint records (gathered over ranks)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g))] * 6
        self.next = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.next < len(self.batches):
            self.next += 1
            yield self.batches[self.next - 1]
        self.next = 0

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next = state["next"]


class Count:
    """The samples an evaluation saw (a metric object: its value is checked equal on all ranks)."""

    def reset(self) -> None:
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        self.n += len(x)

    def compute(self) -> float:
        return float(self.n)


def _mse(m: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.mse_loss(m(b[0]), b[1])


@pytest.mark.parametrize("group", [("one_process", 2)], indirect=True)
def test_data_parallel_create_fit_evaluation_and_checkpoints_ask_collective_device_each_time(
    group: Any, recorded: tuple[list[Collective], list[Any]], tmp_path: Path
) -> None:
    collectives, asked = recorded
    state = ft.TrainState.create(nn.Linear(3, 1), ft.adamw(1e-2), _mse)
    assert state.dist is not None and state.dist.world_size == 2
    count = Count()

    def eval_fn(m: nn.Module, b: Any) -> torch.Tensor:
        count.update(b[0])
        return _mse(m, b)

    ft.fit(
        state,
        Stream(),
        eval_data=Stream().batches[:2],
        eval_fn=eval_fn,
        eval_metrics={"count": count},
        max_steps=4,
        eval_every=2,
        run_mode="step",
        checkpoint_dir=tmp_path,
        save_every=2,
        progress=False,
        verbosity="silent",
    )
    issuers = {c.issuer.f_code.co_name for c in collectives}
    # the creation check and rank 0's weights; the evaluation's sums and its metric objects'
    # agreement; the data's position in each checkpoint; the barrier that ends fit; the step's
    assert issuers == {
        "check_same_model",
        "broadcast_tensors",
        "reduce_sums",
        "all_gather_bytes",
        "barrier",
        "all_reduce_mean",
    }
    assert _unrouted(collectives, asked) == []
    assert {str(device) for _, _, device in asked} == {"cpu"}
    assert all(g is group for _, g, _ in asked)


@pytest.mark.parametrize("group", [("gloo", 1)], indirect=True)
@pytest.mark.parametrize("sharding", ["optimizer", "full"])
def test_a_sharded_state_asks_collective_device_at_create_and_for_its_checkpoints_agreement(
    group: Any, sharding: str, recorded: tuple[list[Collective], list[Any]], tmp_path: Path
) -> None:
    collectives, asked = recorded
    state = ft.TrainState.create(nn.Linear(3, 4), ft.adamw(1e-2), _mse, sharding=sharding)
    for _ in range(2):  # donated: "optimizer" gathers the new rows into the parameters in place
        state, _ = ft.train_step(state, (torch.randn(2, 3), torch.randn(2, 4)), donate=True)
    path = ft.save(state, tmp_path / "ckpt")
    restored = ft.load(path, like=state)
    ft.assert_states_equal(restored, state)
    issuers = {c.issuer.f_code.co_name for c in collectives}
    assert {"check_same_model", "broadcast_tensors", "all_gather_bytes"} <= issuers
    assert ("all_gather" in issuers) == (sharding == "optimizer")
    assert _unrouted(collectives, asked) == []
    on_the_state = [c for c in collectives if c.issuer.f_code.co_name in ON_THE_STATES_TENSORS]
    assert all(d == state.device for c in on_the_state for d in c.devices)
    exchanges = {g for frame, g, _ in asked if frame.f_code.co_name == "all_gather_bytes"}
    assert exchanges and group not in exchanges  # the checkpoint's own gloo group, asked too
