"""torch.distributed: data parallelism (`data_parallel`), launched with ``torchrun``.

``functrain.distributed.init_from_env()`` starts the process group from torchrun's environment;
`TrainState.create` then records it, and the step averages across ranks.
"""

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

__all__ = ["DistConfig", "all_reduce_mean", "broadcast_tensors", "check_same_model", "gather_objects", "init_from_env", "is_main_process", "rank_and_world", "reduce_sums"]
