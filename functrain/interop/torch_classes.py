"""Each `torch.optim` class as functrain has it: the preset, its settings, where the state lives.

`functrain.interop.bridge` moves runs between torch and functrain through this table. For every
supported class, `TorchClass` says which preset reproduces it and with which arguments (read from a
torch parameter group), which functrain state classes hold what torch keeps per parameter (and under
which key), and which of torch's implementations the preset continues bit for bit in float32:
``"fused"``, ``"foreach"`` or ``"single"`` (the single-tensor loop, torch's default on the CPU).
On the CPU the two implementations agree bit for bit for SGD, Adam, AdamW,
RMSprop, Adagrad, Adamax, Adadelta and Rprop; RAdam's single-tensor loop rounds its step
differently from its foreach form (functrain follows foreach), and NAdam's, ASGD's and
Adafactor's foreach forms round differently from their single-tensor loops (functrain follows the
loop). Muon has one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain.optim.base import Transform
from functrain.optim.presets import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    asgd,
    muon,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
    sparse_adam,
)
from functrain.optim.rules.adadelta import AdadeltaState
from functrain.optim.rules.adafactor import AdafactorState
from functrain.optim.rules.adagrad import AdagradState
from functrain.optim.rules.adam import AdamaxState, AdamState, NadamState, RadamState
from functrain.optim.rules.asgd import AsgdState
from functrain.optim.rules.fused import FusedAdagradState, FusedAdamState, FusedSgdState
from functrain.optim.rules.learning_rate import LearningRateState, ScaleByLearningRateState
from functrain.optim.rules.muon import ScaleByMuonState
from functrain.optim.rules.rms import RmspropState
from functrain.optim.rules.rprop import RpropState
from functrain.optim.rules.sparse import SparseAdagradState, SparseAdamState, SparseSgdState
from functrain.optim.rules.trace import SgdState

__all__ = ["TorchClass", "TORCH_CLASSES", "KEYS", "torch_class", "implementation"]

# where torch keeps what each functrain state holds: {state class: {field: torch's per-parameter
# key}};
# a tuple field holds one tensor per parameter, a 0-d field one value torch repeats per parameter;
# of a formula's state (`functrain.optim.rules.formula.RuleState`) the fields are its moments;
# Adafactor's ``row`` and ``col`` are torch's ``row_var`` and ``col_var`` of a matrix, its ``row``
# a vector's ``variance`` (its ``col`` empty: torch keeps none)
KEYS: dict[type, dict[str, str]] = {
    FusedAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    AdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    RadamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},
    RmspropState: {
        "square_avg": "square_avg",
        "grad_avg": "grad_avg",
        "momentum": "momentum_buffer",
    },
    AdagradState: {"sum": "sum"},
    FusedAdagradState: {"sum": "sum"},
    SparseAdagradState: {"sum_of_squares": "sum"},
    SparseAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq"},
    SparseSgdState: {"momentum": "momentum_buffer"},
    SgdState: {"momentum": "momentum_buffer"},
    FusedSgdState: {"momentum": "momentum_buffer"},
    NadamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "mu_product": "mu_product"},
    AdamaxState: {"mu": "exp_avg", "nu": "exp_inf"},
    AdadeltaState: {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    AsgdState: {"eta": "eta", "mu": "mu", "ax": "ax"},
    RpropState: {"prev": "prev", "step_size": "step_size"},
    AdafactorState: {"row": "row_var", "col": "col_var"},
    ScaleByMuonState: {"momentum_buffer": "momentum_buffer"},
    ScaleByLearningRateState: {},
    LearningRateState: {},
}


class TorchClass(NamedTuple):
    """How functrain continues one `torch.optim` class.

    Attributes:
        preset: the functrain preset.
        settings: a torch parameter group's settings as the preset's keyword arguments (less
            ``lr``, ``maximize`` and ``fused``, which the bridge adds).
        needs: the functrain state classes, one of which the preset's state holds.
        counted: torch keeps a per-parameter ``step`` (SGD and Muon keep none).
        exact: the torch implementations the preset continues bit for bit.
        built: torch makes the per-parameter state at construction (Adagrad), not at the first step.
        int_step: torch keeps the ``step`` as a Python int (SparseAdam), not a tensor.
        own_steps: the torch implementations (``"fused"``, ``"foreach"``, ``"single"``) whose
            functrain preset keeps each parameter's own step, as torch does
            (`functrain.optim.rules.formula.Rule.own_steps`), or whose arithmetic reads no step
            (RMSprop's, Adadelta's, Rprop's): a group whose parameters took different numbers
            of steps (some sat out) continues.
    """

    preset: Callable[..., Transform]
    settings: Callable[[dict[str, Any]], dict[str, Any]]
    needs: tuple[type, ...]
    counted: bool = True
    exact: frozenset[str] = frozenset({"foreach", "single"})
    built: bool = False
    int_step: bool = False
    own_steps: frozenset[str] = frozenset()


def _pick(*names: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A group's settings of these names: ``"b1"`` and ``"b2"`` its ``betas`` as floats, a pair
    (``"betas"``, ``"etas"``, ``"step_sizes"``) as a tuple of floats, the others as they are."""

    def read(group: dict[str, Any], name: str) -> Any:
        if name in ("b1", "b2"):
            return float(group["betas"][int(name[1]) - 1])
        if name in ("betas", "etas", "step_sizes"):
            return tuple(float(v) for v in group[name])
        return group[name]

    return lambda group: {name: read(group, name) for name in names}


_adam = _pick("b1", "b2", "eps", "weight_decay", "amsgrad")

_FUSED = frozenset({"fused", "foreach", "single"})
# (an optimizer whose update reads no step: each parameter's count is torch's bookkeeping only)
_NO_STEP = frozenset({"foreach", "single"})

TORCH_CLASSES: dict[type, TorchClass] = {
    torch.optim.SGD: TorchClass(
        sgd,
        _pick("momentum", "nesterov", "dampening", "weight_decay"),
        (),
        counted=False,
        exact=_FUSED,
    ),
    torch.optim.AdamW: TorchClass(
        adamw, _adam, (FusedAdamState, AdamState), exact=_FUSED, own_steps=_FUSED
    ),
    torch.optim.Adam: TorchClass(
        adam,
        lambda g: dict(**_adam(g), decoupled_weight_decay=bool(g.get("decoupled_weight_decay"))),
        (FusedAdamState, AdamState),
        exact=_FUSED,
        own_steps=_FUSED,
    ),
    torch.optim.RMSprop: TorchClass(
        rmsprop,
        _pick("alpha", "eps", "momentum", "centered", "weight_decay"),
        (RmspropState,),
        own_steps=_NO_STEP,
    ),
    torch.optim.Adagrad: TorchClass(
        adagrad,
        _pick("eps", "lr_decay", "initial_accumulator_value", "weight_decay"),
        (FusedAdagradState, AdagradState, SparseAdagradState),
        exact=_FUSED,
        built=True,
        own_steps=_FUSED,
    ),
    torch.optim.RAdam: TorchClass(
        radam,
        _pick("b1", "b2", "eps", "weight_decay", "decoupled_weight_decay"),
        (RadamState,),
        exact=frozenset({"foreach"}),
        own_steps=frozenset({"foreach"}),
    ),
    torch.optim.NAdam: TorchClass(
        nadam,
        _pick("betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"),
        (NadamState,),
        exact=frozenset({"single"}),
        own_steps=_FUSED,
    ),
    torch.optim.Adamax: TorchClass(
        adamax,
        _pick("betas", "eps", "weight_decay"),
        (AdamaxState,),
        own_steps=_FUSED,
    ),
    torch.optim.Adadelta: TorchClass(
        adadelta, _pick("rho", "eps", "weight_decay"), (AdadeltaState,), own_steps=_NO_STEP
    ),
    torch.optim.ASGD: TorchClass(
        asgd,
        _pick("lambd", "alpha", "t0", "weight_decay"),
        (AsgdState,),
        exact=frozenset({"single"}),
        own_steps=frozenset({"single"}),
    ),
    torch.optim.Rprop: TorchClass(
        rprop,
        _pick("etas", "step_sizes"),
        (RpropState,),
        own_steps=_NO_STEP,
    ),
    torch.optim.Adafactor: TorchClass(
        adafactor,
        lambda g: dict(
            beta2_decay=g["beta2_decay"],
            eps=tuple(g["eps"]),
            d=g["d"],
            weight_decay=g["weight_decay"],
        ),
        (AdafactorState,),
        exact=frozenset({"single"}),
        own_steps=frozenset({"single"}),
    ),
    torch.optim.SparseAdam: TorchClass(
        sparse_adam,
        _pick("b1", "b2", "eps"),
        (SparseAdamState,),
        exact=_FUSED,  # one implementation, whatever the flags say
        int_step=True,
        own_steps=_FUSED,
    ),
    torch.optim.Muon: TorchClass(
        muon,
        _pick(
            "weight_decay",
            "momentum",
            "nesterov",
            "ns_coefficients",
            "eps",
            "ns_steps",
            "adjust_lr_fn",
        ),
        (ScaleByMuonState,),
        counted=False,
        exact=frozenset({"single"}),
    ),
}


def torch_class(optimizer: Any) -> TorchClass:
    """The table's entry for a live optimizer of a class in it (its exact class: AdamW before
    Adam)."""
    return TORCH_CLASSES.get(type(optimizer)) or next(
        v for k, v in TORCH_CLASSES.items() if isinstance(optimizer, k)
    )


def implementation(group: dict[str, Any]) -> str:
    """Which implementation torch runs for a parameter group.

    One of ``"fused"``, ``"foreach"`` or ``"single"``.

    As torch decides it: an explicit flag, else foreach where every parameter is on a device with
    foreach kernels (CUDA), else the single-tensor loop (the CPU).
    """
    if group.get("fused"):
        return "fused"
    if group.get("foreach") is not None:
        return "foreach" if group["foreach"] else "single"
    from torch.optim.optimizer import (
        _default_to_fused_or_foreach,
    )  # torch's own choice, private but stable since 2.0

    _, foreach = _default_to_fused_or_foreach(
        list(group["params"]), bool(group.get("differentiable")), use_fused=False
    )
    return "foreach" if foreach else "single"
