"""The driver: `fit` and `evaluate`, the loop they run, its callbacks, history and data sources.

Modules: `fit` (the entry point), `options` (its options as six checked groups, `FitOptions`),
`arguments` (the checks of its arguments against its data and state), `loop` (the plain
loop), `ledger` (what the loop records, saved in ``state.driver``), `evaluation`, `callbacks`,
`history`, `data`, `run_config` (the run's config saved with its checkpoints, compared on resume),
`preemption` (the signals that stop a run with a checkpoint of its state).
"""

from functrain.driver.callbacks import (
    Callback,
    ConsoleLogger,
    JsonlLogger,
    LRMonitor,
    Profiler,
    ProgressBar,
    Run,
    TensorBoardLogger,
    on,
)
from functrain.driver.data import Batcher, DataLoaderSource, IterableSource, StatefulSource
from functrain.driver.evaluation import EvalMetric, evaluate
from functrain.driver.fit import FitResult, fit
from functrain.driver.history import History
from functrain.driver.options import (
    Batching,
    Checkpointing,
    Evaluation,
    Execution,
    FitOptions,
    Logging,
    Stopping,
)
from functrain.driver.preemption import Preempted
from functrain.driver.run_config import ConfigChangeWarning

__all__ = [
    "Batcher",
    "Batching",
    "Callback",
    "Checkpointing",
    "ConfigChangeWarning",
    "ConsoleLogger",
    "DataLoaderSource",
    "EvalMetric",
    "Evaluation",
    "Execution",
    "FitOptions",
    "FitResult",
    "History",
    "IterableSource",
    "JsonlLogger",
    "LRMonitor",
    "Logging",
    "Preempted",
    "ProgressBar",
    "Profiler",
    "Run",
    "StatefulSource",
    "Stopping",
    "TensorBoardLogger",
    "evaluate",
    "fit",
    "on",
]
