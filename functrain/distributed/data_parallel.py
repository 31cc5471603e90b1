"""Data parallelism on `torch.distributed` (launched with ``torchrun``).

When a process group is active, `TrainState.create` records it (`DistConfig`, a static field that
is not saved), makes every rank start from rank 0's weights and checks that all ranks built the
same model. `train_step` then averages gradients, buffers (BatchNorm statistics) and metrics
across ranks in one functional all-reduce per dtype, before clipping and the optimizer, so every
rank computes the same update and holds the same state. The driver shards map-style data by rank
(`Batcher(shard=...)`), evaluates shards and reduces the sums, and lets rank 0 alone write
checkpoints, logs and the progress bar.

Dropout masks differ between ranks: each step, every rank seeds its generator from one draw of the
state's RNG and its rank, and the state carries the generator state after that draw, the same on
all ranks. A checkpoint written by N ranks resumes on M ranks: the state is rank-independent and the
data order is a function of the global sample index.

Launch: ``torchrun --nproc_per_node=2 -m functrain.demo`` (one machine), or ``torchrun --nnodes=2
--node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=G script.py`` (several).
Backend ``gloo`` on CPU, ``nccl`` on GPU (`init_from_env` picks it). The collectives of host
values here run on the device the group's backend takes (`functrain.distributed.backend`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
import safetensors.torch
import torch
import torch.distributed as dist

from functrain.distributed.backend import backend_devices, collective_device
from functrain.errors import ConfigError, PeerFailedError

__all__ = [
    "DistConfig",
    "init_from_env",
    "rank_and_world",
    "is_main_process",
    "all_reduce_mean",
    "broadcast_tensors",
    "check_same_model",
    "all_gather_bytes",
    "all_gather_json",
    "gather_objects",
    "reduce_sums",
    "barrier",
    "peer_failure",
]


@attrs.frozen
class DistConfig:
    """The process group a state trains across (static: not saved in checkpoints).

    `sharding` is None (every rank holds the whole state), ``"optimizer"`` or ``"full"``
    (`functrain.distributed.sharding`); `mesh` is the 1-D `DeviceMesh` its sharded leaves live on;
    `reshard_after_forward` (``"full"``): whether the backward gathers its parameters again.
    """

    world_size: int
    rank: int
    group: Any = attrs.field(default=None, eq=False, repr=False)
    sharding: str | None = None
    mesh: Any = attrs.field(default=None, eq=False, repr=False)
    reshard_after_forward: bool = True


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialized process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank_and_world()[0] == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's environment, if launched by it.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default nccl when CUDA is available, else gloo.

    Returns:
        True when a process group is active afterwards.
    """
    if (
        not dist.is_available()
        or "WORLD_SIZE" not in os.environ
        or int(os.environ["WORLD_SIZE"]) < 2
    ):
        return dist.is_available() and dist.is_initialized()
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(chosen)
    return True


def current_config(
    distributed: bool | None,
    sharding: str | None = None,
    device_type: str = "cpu",
    reshard_after_forward: bool = True,
) -> DistConfig | None:
    """The `DistConfig` for `TrainState.create(distributed=..., sharding=...)`.

    None means auto-detect.

    A sharded state needs an initialized process group, of any size (one rank included).

    Raises:
        ConfigError: sharding without a process group, or ``distributed=True`` without one; the
            group's backend does not take tensors of `device_type`, the state's.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if sharding is not None:
        if not initialized or distributed is False:
            raise ConfigError(
                f"sharding={sharding!r} needs an initialized torch.distributed process group, got "
                + ("distributed=False" if initialized else "none")
                + "; launch with torchrun and call functrain.distributed.init_from_env() "
                "first, or pass sharding=None"
            )
        from functrain.distributed.sharding import make_mesh

        world = dist.get_world_size()
        _check_backend_takes(device_type)
        return DistConfig(
            world,
            dist.get_rank(),
            dist.group.WORLD,
            sharding,
            make_mesh(device_type, world),
            reshard_after_forward,
        )
    active = initialized and dist.get_world_size() > 1
    if distributed and not active:
        raise ConfigError(
            "distributed=True but no torch.distributed process group is initialized; launch with "
            "torchrun and call functrain.distributed.init_from_env()"
        )
    if not active or distributed is False:
        return None
    _check_backend_takes(device_type)
    return DistConfig(dist.get_world_size(), dist.get_rank(), dist.group.WORLD)


def _check_backend_takes(device_type: str) -> None:
    """Refuse a state on a device type the default group's backend takes no tensors of.

    The step's collectives run on the state's tensors; without this a CPU state on NCCL would fail
    at its first all-reduce with torch's "No backend type associated with device type cpu".
    """
    takes = backend_devices()
    if device_type not in takes:
        raise ConfigError(
            f"the process group's backend {str(dist.get_backend())!r} takes {' and '.join(takes)} "
            f"tensors, got a state on {device_type}: the step's collectives run on the state's "
            f"tensors; move the module to {takes[0]} before TrainState.create, or start the "
            f"process group with a backend that takes {device_type} tensors (gloo: cpu and cuda; "
            "init_from_env(backend='gloo'))"
        )


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def all_reduce_mean(tensors: Sequence[torch.Tensor], config: DistConfig) -> list[torch.Tensor]:
    """The mean over ranks of each tensor, in one all-reduce per dtype (flattened buckets).

    Eagerly the bucket is reduced and divided in place: the step holds the gradients and one
    bucket of them at most, as DDP does (a functional all-reduce and its division would add two
    more buckets). Under torch.compile the functional collective keeps the step traceable, and
    inductor places the result.
    """
    import torch.distributed._functional_collectives as funcol

    out: list[torch.Tensor] = list(tensors)
    for _, idx in _buckets(tensors).items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        if torch.compiler.is_compiling():
            mean = funcol.all_reduce(flat, "sum", config.group) / config.world_size
        else:
            dist.all_reduce(
                flat, group=config.group
            )  # a bucket of this step's own: nobody else holds it
            mean = flat.div_(config.world_size)
        for i, piece in zip(idx, torch.split(mean, [tensors[i].numel() for i in idx]), strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out


def average_step(
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    scalars: dict[str, torch.Tensor],
    config: DistConfig,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Average gradients, floating buffers and scalar metrics across ranks, one bucket per dtype.

    With `params` (a replicated state's weights, which may sit an update out without a gradient)
    `grads` may lack some of them: zeros travel in their place, and every rank sends with the
    metrics which weights it has a gradient for (1.0, else 0.0: one float32 each, in the same
    all-reduce). A weight no rank has one for is left out of the mean gradients, as
    ``DistributedDataParallel(find_unused_parameters=True)`` leaves its ``.grad`` None; one that
    some rank has takes the mean with the others' zeros. A rank that lacks a gradient reads the
    senders on the host; one that lacks none reads nothing (no weight lacks one on every rank).
    """
    float_buffers = [k for k, b in buffers.items() if b.is_floating_point()]
    sends, lacking = None, params is not None and len(grads) < len(params)
    if params is not None:
        sends = _senders(grads, params)
        if lacking:
            grads = {k: grads[k] if k in grads else torch.zeros_like(p) for k, p in params.items()}
    items = (
        list(grads.values())
        + [buffers[k] for k in float_buffers]
        + [v.float() for v in scalars.values()]
    )
    mean = all_reduce_mean(items if sends is None else [*items, sends], config)
    n_g, n_b = len(grads), len(float_buffers)
    new_grads = dict(zip(grads, mean[:n_g], strict=True))
    if sends is not None:
        sent = mean.pop()
        if lacking:  # which weights some rank has a gradient for: one host read
            has = sent.tolist()
            new_grads = {k: g for (k, g), n in zip(new_grads.items(), has, strict=True) if n}
    new_buffers = {**buffers, **dict(zip(float_buffers, mean[n_g : n_g + n_b], strict=True))}
    # (copies: a metric the caller keeps holds no more than itself, not the gradients' bucket)
    new_scalars = {
        k: v.to(scalars[k].dtype, copy=True)
        for k, v in zip(scalars, mean[n_g + n_b :], strict=True)
    }
    return new_grads, new_buffers, new_scalars


# per device and count of weights: the senders of a step where this rank has every gradient
_EVERY_SENDS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _senders(grads: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Which of `params` this rank has a gradient of in `grads`: 1.0, else 0.0 (float32), on
    their device; eagerly, where it has every one, one tensor kept for all such steps."""
    device = next(iter(params.values())).device
    if len(grads) < len(params):
        return torch.tensor([float(k in grads) for k in params], device=device)
    if torch.compiler.is_compiling():
        return torch.ones(len(params), device=device)
    key = (device, len(params))
    every = _EVERY_SENDS.get(key)
    if every is None:  # (never written: the all-reduce takes a copy of it in its bucket)
        every = _EVERY_SENDS[key] = torch.ones(len(params), device=device)
    return every


def broadcast_tensors(
    tensors: Mapping[str, torch.Tensor], config: DistConfig, src: int = 0
) -> dict[str, torch.Tensor]:
    """Copies of `tensors` holding rank `src`'s values on every rank.

    The inputs are not written; each copy is on its input's device, the broadcast itself on the
    one the group's backend takes (`collective_device`).
    """
    device = collective_device(config.group)
    out = {}
    for k, v in tensors.items():
        t = v.detach().to(device, copy=True)
        dist.broadcast(t, src, group=config.group)
        out[k] = t.to(v.device)
    return out


def check_same_model(description: str, config: DistConfig) -> None:
    """Raise `ConfigError` if the ranks built different models.

    The models are compared by `description`: names, shapes, dtypes, which tensors train,
    optimizer, options, seed.
    """
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "big")
    mine = torch.tensor(
        [digest, -digest], dtype=torch.int64, device=collective_device(config.group)
    )
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=config.group)
    highest, lowest = mine.tolist()
    if highest != digest or -lowest != digest:
        raise ConfigError(
            f"rank {config.rank}: the ranks disagree on the model structure (names, shapes, "
            "dtypes, which weights train), optimizer, options or seed (digest "
            f"{digest:x} here); every rank must build the same module, freeze the same weights, "
            "and pass the same optimizer and options with the same seed (not seed=rank: "
            "functrain draws each rank's dropout stream from the state's own, and a checkpoint "
            "holds one stream for every rank)"
        )


def reduce_sums(values: torch.Tensor, config: DistConfig | None) -> torch.Tensor:
    """Sum a tensor across ranks (a copy on `values`' device; evaluation sums and counts)."""
    if config is None:
        return values
    out = values.to(collective_device(config.group), copy=True)
    dist.all_reduce(out, group=config.group)
    return out.to(values.device)


# what gloo raises on a rank whose collective another rank left (it exited, or never came)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def peer_failure(error: BaseException, config: DistConfig | None) -> PeerFailedError | None:
    """The `PeerFailedError` to raise for `error`, a collective's, when another rank left it or
    did not reach it within the group's timeout.

    None when `error` is something else (then it propagates as it is), or without a group.
    """
    if config is None or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not any(sign in text for sign in _PEER_GONE):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "Timed out waiting" in text:  # the other rank may still be running, only slower
        return PeerFailedError(
            f"rank {config.rank}: a collective across the {config.world_size} ranks failed "
            f"because another rank did not reach it within the group's timeout ({first[:300]}); "
            "expected every rank to reach each step, evaluation and save within it, got a rank "
            "that was slower (work of its own: an evaluation, save or callback on that rank "
            "alone), or that raised, was stopped or ran out of data first, which its log shows. "
            "Give the process group a longer timeout (torch.distributed.init_process_group("
            "timeout=...)) or keep such work off the ranks' shared steps, and give every rank the "
            "same number of batches"
        )
    return PeerFailedError(
        f"rank {config.rank}: a collective across the {config.world_size} ranks failed because "
        f"another rank left it ({first[:300]}); expected every rank to run the same steps, "
        "evaluations and saves, got a rank that raised, was stopped or ran out of data first: "
        "its log shows the first error. Give every rank the same number of batches, and let an "
        "error on one rank end the run (torchrun stops the other ranks when one fails)"
    )


def barrier(group: Any) -> None:
    """Wait until every rank of `group` has called it (a collective)."""
    device = collective_device(group)
    # NCCL's barrier is an all-reduce on a device: this process's, not the one torch would guess
    # (with a warning) from the rank
    dist.barrier(group=group, device_ids=None if device.index is None else [device.index])


def all_gather_bytes(data: bytes, group: Any) -> list[bytes]:
    """Every rank's `data`, in rank order, through uint8 tensors on `collective_device(group)`."""
    device = collective_device(group)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device), group=group)
    lengths = torch.cat(sizes).tolist()  # one host read
    mine = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    received = [torch.empty(max(lengths), dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(received, mine.to(device), group=group)
    return [r[:n].cpu().numpy().tobytes() for r, n in zip(received, lengths, strict=True)]


def all_gather_json(value: Any, group: Any) -> list[Any]:
    """Every rank's JSON-able `value`, in rank order, as orjson bytes (no pickle)."""
    return [orjson.loads(b) for b in all_gather_bytes(orjson.dumps(value), group)]


def gather_objects(value: Any, config: DistConfig | None) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (``[value]`` in one process).

    `value` is a tree of dicts with str keys, lists, JSON scalars and tensors. Tuples arrive as
    lists.

    A collective: every rank of the group must call it. Nothing is pickled: the tree travels as
    orjson with its tensors in one safetensors blob, so a rank only ever parses data.

    Example:
        >>> gather_objects({"pos": 3, "seen": torch.arange(2)}, None)
        [{'pos': 3, 'seen': tensor([0, 1])}]
    """
    if config is None:
        return [value]
    return [_decode(blob) for blob in all_gather_bytes(_encode(value), config.group)]


def _encode(value: Any) -> bytes:
    tensors: dict[str, torch.Tensor] = {}

    def skeleton(v: Any) -> Any:  # a tensor becomes ["t", its key]; everything else ["v", ...]
        if isinstance(v, torch.Tensor):
            tensors[str(len(tensors))] = v.detach().cpu().contiguous()
            return ["t", str(len(tensors) - 1)]
        if isinstance(v, Mapping):
            return ["d", {k: skeleton(x) for k, x in v.items()}]
        if isinstance(v, (list, tuple)):
            return ["l", [skeleton(x) for x in v]]
        return ["v", v]

    head = orjson.dumps(skeleton(value))
    blob = safetensors.torch.save(tensors) if tensors else b""
    return len(head).to_bytes(8, "little") + head + blob


def _decode(data: bytes) -> Any:
    n = int.from_bytes(data[:8], "little")
    tensors = safetensors.torch.load(data[8 + n :]) if len(data) > 8 + n else {}

    def build(node: list[Any]) -> Any:
        kind, v = node
        if kind == "t":
            return tensors[v]
        if kind == "d":
            return {k: build(x) for k, x in v.items()}
        if kind == "l":
            return [build(x) for x in v]
        return v

    return build(orjson.loads(data[8 : 8 + n]))
