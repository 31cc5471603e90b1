"""Gradient transforms: the contract, scaling rules, wrappers, presets, schedules, averaging.

Modules, bottom up: `porting` (the errors that meet a live torch.optim object, with the functrain
call to write instead), `choices` (torch's implementation choices), `zeros`, `batching`,
`updates` (the lazy update forms and `apply_updates`), `base` (the contract: type aliases,
``Transform(init, update)``, the `Extras` a step gives the updates, the `Report` an update gives
back, `EmptyState`, `identity`),
`naming`, `checks`, `masks`, `combine` (`chain`), `metrics`, `sweep`; `rules` (the scaling rules,
one module per family: `rules.adam`, `rules.rms`, `rules.adagrad`, `rules.lion`, `rules.trace`,
`rules.adadelta`, `rules.rprop`, `rules.asgd`, `rules.adafactor`, `rules.muon`, with the shared
`rules.learning_rate`, `rules.weight_decay`, `rules.clipping`, `rules.arithmetic` and torch's
fused kernels in `rules.fused`); `wrappers` (masked, partition, skip non-finite, accumulate, loss
scaling), `averaging` (EMA), `plateau` (reduce-on-plateau), `schedules` (``step -> value``); and
`presets` (sgd, adam, adamw, ..., muon: formulas, fused kernels, short chains of rules).
"""

from functrain.optim import schedules
from functrain.optim.averaging import EmaState, ema
from functrain.optim.base import (
    NO_EXTRAS,
    NO_REPORT,
    EmptyState,
    Extras,
    ExtrasUpdate,
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

__all__ = [
    "EmaState",
    "SwaState",
    "EmptyState",
    "Extras",
    "ExtrasUpdate",
    "NO_EXTRAS",
    "Report",
    "NO_REPORT",
    "update_with",
    "update_reporting",
    "with_extras",
    "ParamStep",
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
    "swa",
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
    "sparse_adam",
    "skip_nonfinite",
    "sweep",
    "trace",
    "transform_metrics",
    "adadelta",
    "adafactor",
    "adamax",
    "adamw_schedule_free",
    "adan",
    "lamb",
    "asgd",
    "muon",
    "nadam",
    "rprop",
    "partition",
    "asgd_step",
    "nadam_step",
    "scale_by_adadelta",
    "scale_by_adamax",
    "scale_by_adjusted_learning_rate",
    "scale_by_muon",
    "scale_by_rprop",
]
