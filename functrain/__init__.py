"""functrain: train PyTorch models through a functional core."""

from functrain.errors import (
    BatchError,
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    FunctrainError,
    LossError,
    NonFiniteError,
    StateMismatchError,
)
from functrain import distributed, schedules, testing
from functrain.averaging import EmaState, ema
from functrain.callbacks import (
    Callback,
    ConsoleLogger,
    JsonlLogger,
    LRMonitor,
    ProgressBar,
    Profiler,
    Run,
    TensorBoardLogger,
    on,
)
from functrain.checkpoint import fingerprint, load, save
from functrain.data import Batcher, IterableSource
from functrain.driver import FitResult, evaluate, fit
from functrain.generation import SampleText, generate, sample_logits, top_k_filter, top_p_filter
from functrain.history import History
from functrain.manager import CheckpointManager
from functrain.optimizers import adagrad, adam, adamw, lion, radam, rmsprop, sgd
from functrain.plateau import EarlyStopping, observe_plateau, reduce_on_plateau
from functrain.state import StepOptions, TrainState
from functrain.step import BoundModel, eval_step, train_step
from functrain.compiled import CompiledStep, compile_step
from functrain.testing import LeafDiff, assert_states_equal, check_resumption, diff_states
from functrain.transform import (
    EmptyState,
    ParamStep,
    Ratio,
    Transform,
    apply_updates,
    as_tensors,
    chain,
    identity,
    transform_metrics,
)
from functrain.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    clip_by_value,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_radam,
    scale_by_rms,
    trace,
)
from functrain.wrappers import (
    accumulate,
    all_finite,
    check_skip_limits,
    dynamic_loss_scale,
    find_loss_scale,
    masked,
    skip_nonfinite,
)

__all__ = [
    "SampleText",
    "generate",
    "sample_logits",
    "top_k_filter",
    "top_p_filter",
    "LeafDiff",
    "assert_states_equal",
    "check_resumption",
    "diff_states",
    "testing",
    "Batcher",
    "BatchError",
    "BoundModel",
    "Callback",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "ConsoleLogger",
    "EarlyStopping",
    "EmaState",
    "EmptyState",
    "FitResult",
    "FunctrainError",
    "History",
    "IterableSource",
    "JsonlLogger",
    "LossError",
    "LRMonitor",
    "NonFiniteError",
    "ParamStep",
    "Profiler",
    "ProgressBar",
    "Ratio",
    "Run",
    "StateMismatchError",
    "StepOptions",
    "TensorBoardLogger",
    "TrainState",
    "Transform",
    "accumulate",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "all_finite",
    "apply_updates",
    "as_tensors",
    "chain",
    "check_skip_limits",
    "clip_by_global_norm",
    "clip_by_value",
    "distributed",
    "dynamic_loss_scale",
    "ema",
    "eval_step",
    "evaluate",
    "find_loss_scale",
    "fingerprint",
    "fit",
    "identity",
    "lion",
    "load",
    "masked",
    "observe_plateau",
    "on",
    "radam",
    "reduce_on_plateau",
    "rmsprop",
    "save",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_radam",
    "scale_by_rms",
    "schedules",
    "sgd",
    "skip_nonfinite",
    "trace",
    "train_step",
    "compile_step",
    "CompiledStep",
    "transform_metrics",
]

__version__ = "0.1.0"
