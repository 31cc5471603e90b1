"""functrain: train PyTorch models through a functional core.

This module is the one public surface: every public name is importable from `functrain`. The code
lives in subpackages by layer (`docs/architecture.md`): `optim` (transforms, presets, schedules),
`core` (the state and the pure steps), `checkpoint` (format, then policy), `driver` (`fit`),
`distributed`, `config` (runs from a config file, on Hydra, imported on first use), and
`integrations` (W&B, Optuna: optional extras whose names, `WandbLogger` and `OptunaPruning`,
resolve on first use, so importing functrain imports neither package).

`__all__` lists the public names by concept (the state and its steps, ensembles, transforms,
optimizers, rules, wrappers, ..., errors), sorted within each group.
"""

from functrain import distributed, schedules, testing
from functrain.checkpoint.manager import CheckpointManager
from functrain.checkpoint.state_io import VersionWarning, fingerprint, load, load_weights, save
from functrain.config import ConfiguredRun, build_run, load_config
from functrain.core.binding import BoundModel
from functrain.core.compiled import CompiledStep, EagerStepWarning, compile_step
from functrain.core.guards import RecompileWarning
from functrain.core.loss import HostRandomWarning
from functrain.core.options import StepOptions
from functrain.core.stacked import IdenticalMembersWarning, num_members, stack, unstack
from functrain.core.stacked_step import PerMember
from functrain.core.state import TrainState
from functrain.core.step import eval_step, predict, train_loss, train_step
from functrain.core.unroll import ImplicitSolve, implicit_gradient, unroll
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
from functrain.driver.data import (
    Batcher,
    DataLoaderSource,
    IterableSource,
    StatefulSource,
    member_data,
)
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
from functrain.driver.stopping import EarlyStopping
from functrain.errors import (
    BatchError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMemoryError,
    CheckpointPermissionError,
    CheckpointVanishedError,
    ConfigError,
    ConvergenceError,
    DonatedStateError,
    FunctrainError,
    ImmutableStateError,
    LossError,
    NonFiniteError,
    PeerFailedError,
    StateMismatchError,
    WeightlessModuleError,
)
from functrain.generation import SampleText, generate, sample_logits, top_k_filter, top_p_filter
from functrain.interop.bridge import ConvertedOptimizer, from_torch_optimizer, to_torch_state_dict
from functrain.interop.schedulers import ConversionWarning
from functrain.optim.averaging import EmaState, ema
from functrain.optim.base import (
    NO_EXTRAS,
    NO_REPORT,
    EmptyState,
    Extras,
    Report,
    Transform,
    identity,
    update_reporting,
    update_with,
    with_extras,
)
from functrain.optim.combine import chain
from functrain.optim.metrics import transform_metrics
from functrain.optim.plateau import observe_plateau, reduce_on_plateau
from functrain.optim.presets import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    asgd,
    lion,
    muon,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
    sparse_adam,
)
from functrain.optim.rules.adadelta import scale_by_adadelta
from functrain.optim.rules.adagrad import scale_by_adagrad
from functrain.optim.rules.adam import nadam_step, scale_by_adam, scale_by_adamax, scale_by_radam
from functrain.optim.rules.adan import adan
from functrain.optim.rules.asgd import asgd_step
from functrain.optim.rules.clipping import clip_by_global_norm, clip_by_value
from functrain.optim.rules.lamb import lamb
from functrain.optim.rules.learning_rate import scale, scale_by_learning_rate
from functrain.optim.rules.lion import scale_by_lion
from functrain.optim.rules.muon import scale_by_adjusted_learning_rate, scale_by_muon
from functrain.optim.rules.rms import scale_by_rms
from functrain.optim.rules.rprop import scale_by_rprop
from functrain.optim.rules.schedule_free import adamw_schedule_free
from functrain.optim.rules.trace import trace
from functrain.optim.rules.weight_decay import add_decayed_weights
from functrain.optim.swa import SwaState, swa
from functrain.optim.sweep import Sweep, sweep
from functrain.optim.updates import ParamStep, apply_updates, as_tensors
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
from functrain.tree import ReadOnlyDict
from functrain.version import __version__ as __version__

# public names withdrawn, each with what took its place
_WITHDRAWN = {
    "adafactor_step": "functrain.adafactor trains by its formula alone (adafactor_rule, "
    "functrain.optim.rules.adafactor), in every mode; use functrain.adafactor",
    "Ratio": "the building blocks (scale_by_adam, scale_by_rms, ...) emit plain tensors now, each "
    "its formula's direction; the presets (functrain.adam, functrain.rmsprop, ...) give "
    "torch.optim's last rounding",
}


def __getattr__(name: str) -> object:
    """``ft.WandbLogger`` and ``ft.OptunaPruning``, whose modules load on first use; a withdrawn
    name says what took its place."""
    from importlib import import_module

    integrations = import_module("functrain.integrations")
    if name in integrations.MODULES:
        return getattr(integrations, name)
    if name in _WITHDRAWN:
        raise AttributeError(f"functrain.{name} was withdrawn: {_WITHDRAWN[name]}")
    raise AttributeError(f"module 'functrain' has no attribute {name!r}")


__all__ = [
    # the state and its steps
    "BoundModel",
    "CompiledStep",
    "EagerStepWarning",
    "HostRandomWarning",
    "RecompileWarning",
    "StepOptions",
    "TrainState",
    "ReadOnlyDict",
    "compile_step",
    "eval_step",
    "predict",
    "train_loss",
    "train_step",
    # differentiating through training
    "ImplicitSolve",
    "implicit_gradient",
    "unroll",
    # ensembles: stacked states and sweeps
    "IdenticalMembersWarning",
    "PerMember",
    "Sweep",
    "num_members",
    "stack",
    "sweep",
    "unstack",
    # the transform contract and its combinators
    "EmptyState",
    "Extras",
    "NO_EXTRAS",
    "NO_REPORT",
    "ParamStep",
    "Report",
    "Transform",
    "apply_updates",
    "as_tensors",
    "chain",
    "identity",
    "transform_metrics",
    "update_reporting",
    "update_with",
    "with_extras",
    # optimizers (torch.optim's, as chains of the rules below)
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw_schedule_free",
    "adan",
    "lamb",
    "adamw",
    "asgd",
    "lion",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
    "sparse_adam",
    # update rules
    "add_decayed_weights",
    "asgd_step",
    "clip_by_global_norm",
    "clip_by_value",
    "nadam_step",
    "scale",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_adjusted_learning_rate",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "trace",
    # wrappers: accumulation, skipping, loss scaling, masks
    "accumulate",
    "all_finite",
    "check_skip_limits",
    "dynamic_loss_scale",
    "find_loss_scale",
    "masked",
    "partition",
    "skip_nonfinite",
    # weight averages
    "EmaState",
    "SwaState",
    "ema",
    "swa",
    # schedules and plateaus
    "observe_plateau",
    "reduce_on_plateau",
    "schedules",
    # checkpoints
    "CheckpointManager",
    "VersionWarning",
    "fingerprint",
    "load",
    "load_weights",
    "save",
    # the training loop
    "ConfigChangeWarning",
    "EarlyStopping",
    "FitResult",
    "Preempted",
    "History",
    "fit",
    # fit's options, as groups
    "Batching",
    "Checkpointing",
    "Evaluation",
    "Execution",
    "FitOptions",
    "Logging",
    "Stopping",
    # callbacks and loggers
    "Callback",
    "ConsoleLogger",
    "JsonlLogger",
    "LRMonitor",
    "OptunaPruning",
    "Profiler",
    "ProgressBar",
    "Run",
    "TensorBoardLogger",
    "WandbLogger",
    "on",
    # data
    "Batcher",
    "DataLoaderSource",
    "IterableSource",
    "StatefulSource",
    "member_data",
    # evaluation
    "EvalMetric",
    "evaluate",
    # runs from a config file
    "ConfiguredRun",
    "build_run",
    "load_config",
    # torch interop
    "ConversionWarning",
    "ConvertedOptimizer",
    "from_torch_optimizer",
    "to_torch_state_dict",
    # text generation
    "SampleText",
    "generate",
    "sample_logits",
    "top_k_filter",
    "top_p_filter",
    # testing
    "LeafDiff",
    "assert_states_equal",
    "check_resumption",
    "diff_states",
    "testing",
    # distributed training
    "distributed",
    # errors
    "BatchError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMemoryError",
    "CheckpointPermissionError",
    "CheckpointVanishedError",
    "ConfigError",
    "ConvergenceError",
    "DonatedStateError",
    "ImmutableStateError",
    "FunctrainError",
    "LossError",
    "NonFiniteError",
    "StateMismatchError",
    "WeightlessModuleError",
    "PeerFailedError",
]
