"""Gradient transforms: the contract, primitives, wrappers, presets, schedules, averaging.

Modules, bottom up: `zeros` (constant state held without storage until written), `transform`
(the contract: ``Transform(init, update)``, `chain`, `apply_updates`), `primitives` (scaling rules, momentum, decay, learning rate, clipping),
`wrappers` (masked, skip non-finite, accumulate, loss scaling), `averaging` (EMA), `fused`
(torch's fused SGD, Adam and Adagrad kernels), `presets` (sgd, adam, adamw, ...: short chains of primitives),
`update_rules` and `more_presets` (the rest of torch.optim: nadam, adamax, adadelta, asgd, rprop,
adafactor, muon),
`schedules` (``step -> value``), `plateau` (early stopping and reduce-on-plateau), `porting` (the
errors that meet a live torch.optim object, with the functrain call to write instead).
"""

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

__all__ = [
    "EarlyStopping",
    "EmaState",
    "EmptyState",
    "ParamStep",
    "Ratio",
    "Sweep",
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
    "dynamic_loss_scale",
    "ema",
    "find_loss_scale",
    "identity",
    "lion",
    "masked",
    "observe_plateau",
    "radam",
    "reduce_on_plateau",
    "rmsprop",
    "scale",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_radam",
    "scale_by_rms",
    "schedules",
    "sgd",
    "skip_nonfinite",
    "sweep",
    "trace",
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
]
