"""torch.distributed: data parallelism (`data_parallel`) and sharded states (`sharding`).

A run is launched with ``torchrun``: ``functrain.distributed.init_from_env()`` starts the process
group from torchrun's environment; `TrainState.create` then records it, and the step averages across
ranks. With ``TrainState.create(..., sharding="optimizer" | "full")`` each rank holds slices of the
state (`DTensor`s); `gather_tree` gathers such a tree whole. A sharded state can start from a module
built on the meta device (`materialize`: each rank gives values to its own rows, one submodule at a
time). The values exchanged outside the step go through `collective_device`: the CPU where the
group's backend takes it, else the accelerator's current device (`backend`).
"""

from functrain.distributed.backend import collective_device
from functrain.distributed.data_parallel import (
    DistConfig,
    all_reduce_mean,
    broadcast_tensors,
    check_same_model,
    gather_objects,
    init_from_env,
    is_main_process,
    rank_and_world,
    reduce_sums,
)
from functrain.distributed.sharding import Sharding, gather_tree, is_sharded

__all__ = [
    "DistConfig",
    "Sharding",
    "all_reduce_mean",
    "broadcast_tensors",
    "check_same_model",
    "collective_device",
    "gather_objects",
    "gather_tree",
    "init_from_env",
    "is_main_process",
    "is_sharded",
    "rank_and_world",
    "reduce_sums",
]
