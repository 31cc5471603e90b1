"""functrain: train PyTorch models through a functional core.

This module is the one public surface: every public name is importable from `functrain`. The code
lives in subpackages by layer (`docs/architecture.md`): `optim` (transforms, presets, schedules),
`core` (the state and the pure steps), `checkpoint` (format, then policy), `driver` (`fit`),
`distributed`, `config` (runs from a config file, on Hydra, imported on first use), and
`integrations` (W&B, Optuna: optional extras whose names, `WandbLogger` and `OptunaPruning`,
resolve on first use, so importing functrain imports neither package).
"""

from functrain import _moved, distributed, testing
from functrain.bridge import ConvertedOptimizer, from_torch_optimizer, to_torch_state_dict
from functrain.checkpoint.manager import CheckpointManager
from functrain.checkpoint.state_io import VersionWarning, fingerprint, load, load_weights, save
from functrain.config import ConfiguredRun, build_run, load_config
from functrain.core.compiled import CompiledStep, compile_step
from functrain.core.ensemble import num_members, stack, unstack
from functrain.core.options import StepOptions
from functrain.core.state import TrainState
from functrain.core.step import BoundModel, eval_step, train_step
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
from functrain.driver.evaluation import evaluate
from functrain.driver.fit import FitResult, fit
from functrain.driver.history import History
from functrain.driver.run_config import ConfigChangeWarning
from functrain.errors import (
    BatchError,
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    DonatedStateError,
    FunctrainError,
    LossError,
    NonFiniteError,
    StateMismatchError,
)
from functrain.generation import SampleText, generate, sample_logits, top_k_filter, top_p_filter
from functrain.optim import schedules
from functrain.optim.averaging import EmaState, ema
from functrain.optim.more_presets import adadelta, adafactor, adamax, asgd, muon, nadam, rprop
from functrain.optim.plateau import EarlyStopping, observe_plateau, reduce_on_plateau
from functrain.optim.presets import adagrad, adam, adamw, lion, radam, rmsprop, sgd
from functrain.optim.primitives import (
    add_decayed_weights,
    clip_by_global_norm,
    clip_by_value,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_radam,
    scale_by_rms,
    trace,
)
from functrain.optim.sweep import Sweep, sweep
from functrain.optim.transform import (
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
from functrain.optim.update_rules import (
    adafactor_step,
    asgd_step,
    nadam_step,
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_adjusted_learning_rate,
    scale_by_muon,
    scale_by_rprop,
)
from functrain.optim.wrappers import (
    accumulate,
    all_finite,
    check_skip_limits,
    dynamic_loss_scale,
    find_loss_scale,
    masked,
    partition,
    skip_nonfinite,
)
from functrain.testing import LeafDiff, assert_states_equal, check_resumption, diff_states

# the module paths of before the layout keep working (imports and attributes), with a DeprecationWarning;
# the integrations' names load their modules on first use
_moved.install()
__getattr__ = _moved.package_getattr

__all__ = [
    "ConfigChangeWarning",
    "ConfiguredRun",
    "build_run",
    "load_config",
    "ConvertedOptimizer",
    "from_torch_optimizer",
    "to_torch_state_dict",
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
    "DonatedStateError",
    "DataLoaderSource",
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
    "StatefulSource",
    "StepOptions",
    "TensorBoardLogger",
    "WandbLogger",
    "OptunaPruning",
    "TrainState",
    "VersionWarning",
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
    "load_weights",
    "masked",
    "observe_plateau",
    "on",
    "radam",
    "reduce_on_plateau",
    "rmsprop",
    "scale",
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
    "adadelta",
    "adafactor",
    "adamax",
    "asgd",
    "muon",
    "nadam",
    "rprop",
    "partition",
    "adafactor_step",
    "asgd_step",
    "nadam_step",
    "scale_by_adadelta",
    "scale_by_adamax",
    "scale_by_adjusted_learning_rate",
    "scale_by_muon",
    "scale_by_rprop",
    "stack",
    "unstack",
    "num_members",
    "Sweep",
    "sweep",
]

__version__ = "0.1.0"
