"""`evaluate`: `eval_step` metrics averaged over a data set, summed on the device and read once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from functrain.core.body import samples_in
from functrain.core.stacked import member_columns
from functrain.core.state import TrainState
from functrain.core.step import eval_step
from functrain.distributed.data_parallel import reduce_sums
from functrain.errors import ConfigError, config_check

__all__ = ["evaluate"]


def evaluate(
    state: TrainState, data: Iterable[Any], *, use_ema: bool = False, prefix: str = "val_"
) -> dict[str, float]:
    """Average `eval_step` metrics over `data` (weighted by batch size, summed on the device).

    Args:
        state: the state to evaluate.
        data: an iterable of batches.
        use_ema: evaluate the EMA weights.
        prefix: prepended to metric names (``"val_"`` gives ``val_loss``).

    Returns:
        Host floats, one read back at the end.

    Raises:
        ConfigError: `state` is not a `TrainState`, `data` is not an iterable of batches (a
            map-style dataset needs batching: pass a `DataLoader`), or it yielded no batch with
            samples.

    Example:
        >>> import torch, functrain as ft
        >>> loss = lambda m, b: (m(b) ** 2).mean()
        >>> s = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.1), loss)
        >>> sorted(evaluate(s, [torch.ones(4, 1), torch.zeros(2, 1)]))
        ['val_loss']
    """
    _check_arguments(state, data, use_ema)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in data:
        n = samples_in(batch)
        if n == 0:
            continue
        metrics = eval_step(state, batch, use_ema=use_ema)
        for k, v in (member_columns(metrics) if state.step.ndim else metrics).items():
            sums[k] = sums[k] + v.double() * n if k in sums else v.double() * n
        count += n
    keys = list(sums)
    if state.dist is not None:
        # every rank evaluated its shard: add up sums and counts (ranks must produce the same metric
        # names)
        totals = reduce_sums(
            torch.stack(
                [
                    *(sums[k] for k in keys),
                    torch.tensor(float(count), dtype=torch.float64, device=state.device),
                ]
            ),
            state.dist,
        )
        sums, count = dict(zip(keys, totals[:-1], strict=True)), int(totals[-1])
    if not count:
        raise ConfigError(
            "the evaluation data yielded no batch with samples: pass batches holding samples "
            "(e.g. a DataLoader over a non-empty dataset)"
        )
    values = (torch.stack([sums[k] for k in keys]) / count).tolist()  # one host read per evaluation
    return {f"{prefix}{k}": float(v) for k, v in zip(keys, values, strict=True)}


def _check_arguments(state: Any, data: Any, use_ema: bool) -> None:
    problems = []
    if not isinstance(state, TrainState):
        problems.append(f"state must be a functrain.TrainState, got {type(state).__name__}")
    elif use_ema and state.ema_state is None:
        problems.append(
            "use_ema=True needs a state created with ema_decay=...; this state has no EMA"
        )
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        # iterating it would yield single samples, each taken for a batch
        problems.append(
            f"data must be an iterable of batches, got a map-style {type(data).__name__}: pass "
            "DataLoader(data, batch_size=...)"
        )
    elif not isinstance(data, Iterable):
        problems.append(
            "data must be an iterable of batches (a DataLoader, a list of batches), got "
            f"{type(data).__name__}"
        )
    config_check(problems, "evaluate")
