"""The step's static options (`StepOptions`) and the transform they make of the user's optimizer.

`TrainState.create` gathers its keyword options into a `StepOptions`, checks them (`problems`),
and wraps the user's optimizer with `build_transform`: clipping, skipping non-finite updates (or
dynamic loss scaling for fp16), and accumulation, in the one order that keeps their meaning.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import attrs

from functrain.errors import ConfigError
from functrain.optim.averaging import EmaConvention, ema_problems
from functrain.optim.base import Transform, is_transform
from functrain.optim.combine import chain
from functrain.optim.naming import recorded_call
from functrain.optim.rules.clipping import clip_by_global_norm
from functrain.optim.wrappers import (
    ScheduleCount,
    accumulate,
    dynamic_loss_scale,
    loss_scale_problems,
    schedule_count_problems,
    skip_nonfinite,
)

__all__ = [
    "ScheduleCount",
    "StepOptions",
    "LossScale",
    "as_loss_scale",
    "own_loss_scale",
    "scaler_problems",
    "Precision",
    "NonFinitePolicy",
    "GradStats",
    "AccumulateConvention",
    "Differentiable",
    "build_transform",
    "ema_buffers_default",
    "loss_divisor",
]

Precision = Literal["fp32", "bf16", "fp16"]
NonFinitePolicy = Literal["skip", "halt", "none"]
# how `grad_stats=` groups the gradient statistics among a step's metrics
GradStats = Literal["layer", "param"]
# how `accumulate_steps=N` makes one update of N micro-batches (`TrainState.create`): "loss" divides
# the loss by N before the backward and sums the gradients; "mean" sums the gradients and divides
# the sum by N; "sum" sums the gradients of the loss as given
AccumulateConvention = Literal["loss", "mean", "sum"]
# how a state's steps are differentiated (`TrainState.create`): not at all (False), exactly (True:
# through the updates and the gradients, second order included), or "first_order" (through the
# updates only: the gradients are constants, first-order MAML's)
Differentiable = bool | Literal["first_order"]


@attrs.frozen
class LossScale:
    """How precision="fp16" scales the loss: `torch.amp.GradScaler`'s arguments, its defaults.

    `TrainState.create` takes them as ``loss_scale=dict(init_scale=..., growth_factor=...,
    backoff_factor=..., growth_interval=...)``, any of them (the others keep these defaults).
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


def as_loss_scale(value: Mapping[str, float] | LossScale | None) -> Any:
    """`loss_scale=` as `StepOptions` keeps it: a `LossScale` (None: GradScaler's defaults).

    A mapping of its fields becomes one, numbers as floats and the interval an int (so that
    ``init_scale=1024`` and ``1024.0`` name one run); anything else is kept as given, for
    `StepOptions.problems` to show.

    Example:
        >>> as_loss_scale({"init_scale": 1024, "growth_interval": 100})
        LossScale(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=100)
    """
    if value is None:
        return LossScale()
    if not isinstance(value, Mapping) or not set(value) <= set(attrs.fields_dict(LossScale)):
        return value

    def plain(key: str, x: Any) -> Any:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return x
        if key == "growth_interval":
            return int(x) if isinstance(x, numbers.Integral) else x
        return float(x)

    return LossScale(**{key: plain(key, x) for key, x in value.items()})


def _named(fn: Any) -> str:
    """A function as `StepOptions` shows it: its qualified name, not where it lives in memory."""
    if fn is None or not callable(fn):
        return repr(fn)
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


@attrs.frozen
class StepOptions:
    """The static options of a state (they shape the step; they are not saved as tensors)."""

    precision: Precision = "fp32"
    accumulate_steps: int = 1
    clip_grad_norm: float | None = None
    nonfinite: NonFinitePolicy = "skip"
    max_consecutive_nonfinite: int | None = None
    ema_decay: float | None = None
    ema_warmup: bool = False
    swa_start: int | None = None
    # how the EMA starts, warms up and treats buffers (`functrain.ema`'s convention and settings);
    # `ema_buffers` as resolved by `TrainState.create` (None there: the convention's default)
    ema_convention: EmaConvention = "functrain"
    ema_buffers: bool = False
    ema_update_after_step: int = 0
    ema_warmup_power: float = 2 / 3
    ema_warmup_gamma: float = 1.0
    ema_min_decay: float = 0.0
    # torchvision's reference EMA: its moves every `ema_update_every` updates of an epoch of
    # `ema_steps_per_epoch`, copies through `ema_reset_steps` (`functrain.ema`'s settings)
    ema_update_every: int = 1
    ema_steps_per_epoch: int | None = None
    ema_reset_steps: int = 0
    accumulate_convention: AccumulateConvention = "loss"
    # steps that autograd and torch.func differentiate (`functrain.optim.differentiable`): True
    # (exactly) or "first_order" (through the updates, the gradients taken as constants)
    differentiable: Differentiable = False
    # how precision="fp16" scales the loss (GradScaler's arguments); GradScaler's defaults
    loss_scale: LossScale = attrs.field(factory=LossScale, converter=as_loss_scale)
    # where the optimizer reads its schedules under the step's guard (the loss scale, or the
    # non-finite skip): at the updates applied, or also at the steps skipped ("steps": torch's
    # schedulers stepped every iteration)
    schedule_count: ScheduleCount = "updates"
    # the gradients' global norm among every step's metrics (``grad_norm``), where clipping does
    # not measure it anyway (`reports_grad_norm`); a metric, not the run's: not in checkpoints
    grad_norm: bool = False
    # how a batch's samples are counted (`samples_seen`, fit's evaluation means): a function of the
    # batch returning an int, or None (the first dimension of its first tensor, `samples_in`); a
    # function, like the loss function: not in checkpoints, only whether one is declared
    # (`TrainState.create`); shown by its name (so that the ranks of a process group, which
    # compare the options, describe it alike)
    samples: Callable[[Any], int] | None = attrs.field(default=None, repr=_named)

    @property
    def reports_grad_norm(self) -> bool:
        """Whether a step reports ``grad_norm``: asked for (`grad_norm`), or measured by clipping.

        Example:
            >>> StepOptions().reports_grad_norm, StepOptions(clip_grad_norm=1.0).reports_grad_norm
            (False, True)
        """
        return self.grad_norm is True or self.clip_grad_norm is not None

    @property
    def guards_buffers(self) -> bool:
        """Whether a step keeps each floating buffer as it was where the batch made it
        non-finite: where it guards against non-finite steps, or scales an fp16 loss (whose
        overflows it skips).

        Example:
            >>> StepOptions().guards_buffers, StepOptions(nonfinite="none").guards_buffers
            (True, False)
        """
        return self.nonfinite != "none" or self.precision == "fp16"

    def problems(self) -> list[str]:
        """Every invalid option, each with the value given (empty when all are valid).

        Example:
            >>> for problem in StepOptions(precision="fp64", accumulate_steps=0).problems():
            ...     print(problem)
            precision must be 'fp32', 'bf16' or 'fp16', got precision='fp64'
            accumulate_steps must be an int >= 1, got accumulate_steps=0
        """
        problems = []
        if self.precision not in ("fp32", "bf16", "fp16"):
            problems.append(
                f"precision must be 'fp32', 'bf16' or 'fp16', got precision={self.precision!r}"
            )
        if not isinstance(self.accumulate_steps, int) or self.accumulate_steps < 1:
            problems.append(
                "accumulate_steps must be an int >= 1, "
                f"got accumulate_steps={self.accumulate_steps!r}"
            )
        if self.accumulate_convention not in ("loss", "mean", "sum"):
            problems.append(
                "accumulate_convention must be 'loss', 'mean' or 'sum', "
                f"got accumulate_convention={self.accumulate_convention!r}"
            )
        clip = self.clip_grad_norm
        if clip is not None and not (_is_number(clip) and clip > 0):
            problems.append(
                f"clip_grad_norm must be a number > 0 or None, got clip_grad_norm={clip!r}"
            )
        if self.nonfinite not in ("skip", "halt", "none"):
            problems.append(
                f"nonfinite must be 'skip', 'halt' or 'none', got nonfinite={self.nonfinite!r}"
            )
        if self.precision == "fp16" and self.nonfinite == "halt":
            problems.append(
                "nonfinite='halt' does not combine with precision='fp16' "
                "(loss scaling skips overflows by design); "
                "use max_consecutive_nonfinite=N to stop after N overflows in a row"
            )
        cap = self.max_consecutive_nonfinite
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            problems.append(f"max_consecutive_nonfinite must be an int >= 0 or None, got {cap!r}")
        start = self.swa_start
        if start is not None and (
            isinstance(start, bool) or not isinstance(start, int) or start < 0
        ):
            problems.append(f"swa_start must be an int >= 0 or None, got swa_start={start!r}")
        if start is not None and self.ema_decay is not None:
            problems.append(
                "ema_decay and swa_start both ask for the state's one average: keep one (an EMA, "
                "or the equal average of stochastic weight averaging)"
            )
        if self.samples is not None and not callable(self.samples):
            problems.append(
                "samples must be a function of a batch returning its samples (an int), or None, "
                f"got samples={self.samples!r}"
                + (
                    f"; to count every batch as {self.samples}, samples=lambda batch: "
                    f"{self.samples}"
                    if type(self.samples) is int
                    else ""
                )
            )
        if not isinstance(self.grad_norm, bool):
            problems.append(f"grad_norm must be True or False, got grad_norm={self.grad_norm!r}")
        if self.ema_decay is not None and not self._valid_ema_decay:
            problems.append(
                f"ema_decay must be a number in [0, 1) or None, got ema_decay={self.ema_decay!r}"
                + (
                    "; a decay that changes with the step (DINO's or BYOL's momentum schedule) "
                    "is a teacher kept in your loop: pass its weights in the batch and move them "
                    "from state.params after each step (the porting guide, DINO's teacher)"
                    if callable(self.ema_decay)
                    else ""
                )
            )
        return (
            problems
            + self._ema_problems()
            + self._differentiable_problems()
            + self._loss_scale_problems()
            + schedule_count_problems(self.schedule_count)
        )

    @property
    def _valid_ema_decay(self) -> bool:
        decay: Any = self.ema_decay  # as given: not always the float it should be
        return _is_number(decay) and 0.0 <= decay < 1.0

    def _loss_scale_problems(self) -> list[str]:
        """`loss_scale` GradScaler's arguments, each in range, for a state that scales its loss."""
        scale = self.loss_scale
        keys = list(attrs.fields_dict(LossScale))
        if not isinstance(scale, LossScale):
            unknown = [k for k in scale if k not in keys] if isinstance(scale, Mapping) else []
            hint = "".join(f"; {k!r} is none of them" + _close(str(k), keys) for k in unknown[:3])
            return [
                f"loss_scale must be a dict of torch.amp.GradScaler's {', '.join(keys)} (any of "
                f"them), or None for its defaults, got loss_scale={scale!r}{hint}"
            ]
        if scale == LossScale():
            return []
        if self.precision != "fp16":
            return [
                f"loss_scale sets how precision='fp16' scales the loss, and "
                f"precision={self.precision!r} scales none: give precision='fp16' too, or drop "
                "loss_scale"
            ]
        return [f"loss_scale: {p}" for p in loss_scale_problems(*attrs.astuple(scale))]

    def _differentiable_problems(self) -> list[str]:
        """`differentiable` a valid mode, and not with what its step cannot do: scale its loss
        (fp16)."""
        if (
            self.differentiable not in (True, False, "first_order")
            or isinstance(self.differentiable, int)
            and not isinstance(self.differentiable, bool)
        ):
            return [
                "differentiable must be True, False or 'first_order', got "
                f"differentiable={self.differentiable!r}"
            ]
        if self.differentiable and self.precision == "fp16":
            return [
                "precision='fp16' does not combine with differentiable=True: the dynamic loss "
                "scale skips and rescales steps by what it reads back, which no gradient "
                "follows; train in float32 or float64 (or precision='bf16')"
            ]
        return []

    def _ema_problems(self) -> list[str]:
        """The EMA's convention and settings: each valid, of its convention, with an EMA to set."""
        settings = {
            "ema_convention": (self.ema_convention, "functrain"),
            "ema_buffers": (self.ema_buffers, ema_buffers_default(self.ema_convention)),
            "ema_update_after_step": (self.ema_update_after_step, 0),
            "ema_warmup_power": (self.ema_warmup_power, 2 / 3),
            "ema_warmup_gamma": (self.ema_warmup_gamma, 1.0),
            "ema_min_decay": (self.ema_min_decay, 0.0),
            "ema_update_every": (self.ema_update_every, 1),
            "ema_steps_per_epoch": (self.ema_steps_per_epoch, None),
            "ema_reset_steps": (self.ema_reset_steps, 0),
        }
        if self.ema_decay is None:
            given = [k for k, (value, default) in settings.items() if value != default]
            if not given:
                return []
            return [
                f"{', '.join(given)} set how an EMA averages, and this state keeps none: give "
                "ema_decay= too"
                + (
                    " (swa_start's equal average averages the parameters only, as torch's "
                    "AveragedModel does by default: for the BatchNorm statistics of the averaged "
                    "weights run torch's update_bn on state.export_module(use_ema=True))"
                    if self.swa_start is not None
                    else ""
                )
            ]
        return (
            ema_problems(
                # ema_decay's own check is above: here it bounds min_decay, where it is valid
                self.ema_decay if self._valid_ema_decay else 0.5,
                self.ema_warmup,
                self.ema_convention,
                self.ema_buffers,
                self.ema_update_after_step,
                self.ema_warmup_power,
                self.ema_warmup_gamma,
                self.ema_min_decay,
                self.ema_update_every,
                self.ema_steps_per_epoch,
                self.ema_reset_steps,
                prefix="ema_",
            )
            + self._buffers_problems()
        )

    def _buffers_problems(self) -> list[str]:
        """torchvision's reference EMA averages the buffers: a state of it that would not."""
        if self.ema_convention != "torchvision" or self.ema_buffers is not False:
            return []
        return [
            "ema_buffers=False: torchvision's reference EMA averages the buffers (its "
            "AveragedModel has use_buffers=True); leave ema_buffers out, or give "
            "ema_convention='torch' for an AveragedModel with use_buffers=False"
        ]


def ema_buffers_default(convention: str) -> bool:
    """Whether a convention averages the buffers unless told: timm's ``ModelEmaV3`` does
    (``exclude_buffers=False``), and torchvision's reference (``use_buffers=True``); torch's
    `AveragedModel` does not (``use_buffers=False``), nor functrain's own EMA."""
    return convention in ("timm", "torchvision")


def _is_number(value: Any) -> bool:
    """A real number, not a bool (``True`` is no decay nor norm a user means)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _close(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _shortened(name: str, most: int = 200) -> str:
    return name if len(name) <= most else name[:most] + "..."


def _own_scaler(optimizer: Any) -> tuple[Transform, LossScale, ScheduleCount] | None:
    """The inner optimizer, the settings and the schedules' count of `optimizer` where it is
    ``dynamic_loss_scale(inner, ...)``, else None."""
    call = recorded_call(optimizer)
    if call is None or call.factory is not dynamic_loss_scale:
        return None
    settings = {k: v for k, v in call.arguments.items() if k not in ("inner", "schedule_count")}
    return call.arguments["inner"], as_loss_scale(settings), call.arguments["schedule_count"]


def _scalers_in(optimizer: Any) -> Iterator[Transform]:
    """The `dynamic_loss_scale`s among the transforms `optimizer` was built of, itself included
    (those a named factory recorded: a transform built by hand hides what it holds)."""
    call = recorded_call(optimizer) if is_transform(optimizer) else None
    if call is None:
        return
    if call.factory is dynamic_loss_scale:
        yield optimizer
    for value in call.arguments.values():
        for held in _transforms_in(value):
            yield from _scalers_in(held)


def _transforms_in(value: Any) -> Iterator[Any]:
    """The transforms an argument holds: itself, or those of a tuple, list or dict."""
    if is_transform(value):
        yield value
    elif isinstance(value, tuple | list):
        for x in value:
            yield from _transforms_in(x)
    elif isinstance(value, dict):
        for x in value.values():
            yield from _transforms_in(x)


def scaler_problems(optimizer: Any, options: StepOptions) -> list[str]:
    """What keeps precision="fp16" from taking the optimizer's own loss scaler as the step's, and
    what keeps another precision from taking a scaler at all.

    Its own ``dynamic_loss_scale(inner, ...)``, outermost, is the step's (`own_loss_scale`); one
    held inside would divide the gradients by a second scale, or see them scaled (clipping before
    it, an accumulation around it), and settings given both there and as ``loss_scale=`` could
    disagree. Under fp32 or bf16 no step scales its loss: a scaler would divide the gradients by
    a scale nothing multiplied them by.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.dynamic_loss_scale(ft.sgd(0.1)))
        >>> print(scaler_problems(tx, StepOptions(precision="fp16"))[0][:75])
        the optimizer holds a dynamic_loss_scale inside (chain(clip_by_global_norm(
    """
    if not is_transform(optimizer):
        return []
    if options.precision != "fp16":
        if next(_scalers_in(optimizer), None) is None:
            return []
        return [
            f"the optimizer holds a dynamic_loss_scale ({_shortened(optimizer.name)}), which "
            "divides the gradients by the scale the step multiplies the loss by under "
            f"precision='fp16'; precision={options.precision!r} scales no loss, so every update "
            "would be that many times too small: give precision='fp16' (then it is the step's "
            "scaler), or drop dynamic_loss_scale (fp32 and bf16 need no loss scaling)"
        ]
    own = _own_scaler(optimizer)
    problems = []
    if next(_scalers_in(optimizer if own is None else own[0]), None) is not None:
        problems.append(
            "the optimizer holds a dynamic_loss_scale inside "
            f"({_shortened(optimizer.name)}): under precision='fp16' the step scales the loss "
            "once, and its one scaler unscales the gradients before anything else sees them "
            "(clipping, accumulation, another scaler); "
            "give it outermost, TrainState.create(dynamic_loss_scale(optimizer, ...), ..., "
            "precision='fp16'), with clip_grad_norm= and accumulate_steps= for the clipping and "
            "accumulation around it, or drop it and give its arguments as "
            "loss_scale=dict(init_scale=..., growth_factor=..., backoff_factor=..., "
            "growth_interval=...)"
        )
    if own is not None and options.loss_scale not in (LossScale(), own[1]):
        theirs, ours = (
            ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(s).items())
            for s in (own[1], options.loss_scale)
        )
        problems.append(
            f"the optimizer's dynamic_loss_scale(..., {theirs}) and loss_scale=dict({ours}) "
            "both set the loss scale, and differ: give the settings once, in the one or the other"
        )
    return problems


def own_loss_scale(optimizer: Transform, options: StepOptions) -> tuple[Transform, StepOptions]:
    """The optimizer and options to build the step's transform of, fp16's scaler taken as given.

    Under precision="fp16" an optimizer given as ``dynamic_loss_scale(inner, ...)`` is `inner`
    with its settings as the step's `loss_scale`: the step's one scaler is then the user's, and
    the gradients are unscaled (`GradScaler.unscale_`) before clipping, as torch's AMP recipe
    does. Elsewhere both are as given.

    Raises:
        ConfigError: what `scaler_problems` finds.

    Example:
        >>> import functrain as ft
        >>> tx = ft.dynamic_loss_scale(ft.sgd(0.1), growth_interval=100)
        >>> inner, options = own_loss_scale(tx, StepOptions(precision="fp16"))
        >>> inner.name[:12], options.loss_scale.growth_interval
        ('sgd(lr=0.1, ', 100)
    """
    problems = scaler_problems(optimizer, options)
    if problems:
        raise ConfigError(
            f"invalid optimizer for precision={options.precision!r}:\n  - "
            + "\n  - ".join(problems)
        )
    own = _own_scaler(optimizer) if options.precision == "fp16" else None
    if own is None:
        return optimizer, options
    inner, settings, its_count = own
    # the scaler's own count for the schedules, where it asks for steps
    counted: ScheduleCount = (
        "steps" if "steps" in (its_count, options.schedule_count) else "updates"
    )
    return inner, attrs.evolve(options, loss_scale=settings, schedule_count=counted)


def build_transform(optimizer: Transform, options: StepOptions) -> Transform:
    """Wrap the user's optimizer as `options` ask: clip, skip non-finite (or scale), accumulate.

    Accumulation is outermost, so the checks see the window's gradient (its sum, or with
    ``accumulate_convention="mean"`` its mean): a non-finite
    micro-batch makes the whole window's update a counted no-op, and the counters advance with
    every batch whatever happens (the driver can count on the host without reading them back).

    Example:
        >>> import functrain as ft
        >>> options = StepOptions(accumulate_steps=4, clip_grad_norm=1.0)
        >>> print(build_transform(ft.sgd(0.1), options).name)  # doctest: +NORMALIZE_WHITESPACE
        accumulate(inner=skip_nonfinite(inner=chain(clip_by_global_norm(max_norm=1.0),
        sgd(lr=0.1, momentum=0.0, nesterov=False, dampening=0.0, weight_decay=0.0, mask=None,
        fused=True)), max_consecutive=None), every=4, reduce='sum')
    """
    tx = optimizer
    if options.clip_grad_norm is not None:
        tx = chain(clip_by_global_norm(options.clip_grad_norm), tx)
    if options.precision == "fp16":
        # overflows are part of loss scaling: the scaler skips them; only a cap on runs raises
        counted = options.schedule_count
        tx = dynamic_loss_scale(tx, **attrs.asdict(options.loss_scale), schedule_count=counted)
        if options.max_consecutive_nonfinite is not None:
            tx = skip_nonfinite(
                tx, max_consecutive=options.max_consecutive_nonfinite, schedule_count=counted
            )
    elif options.nonfinite in ("skip", "halt"):
        cap = 0 if options.nonfinite == "halt" else options.max_consecutive_nonfinite
        tx = skip_nonfinite(tx, max_consecutive=cap, schedule_count=options.schedule_count)
    if options.accumulate_steps > 1:
        reduce = "mean" if options.accumulate_convention == "mean" else "sum"
        tx = accumulate(
            tx, options.accumulate_steps, reduce=reduce, report_norm=options.reports_grad_norm
        )
    return tx


def loss_divisor(options: StepOptions) -> int | None:
    """What the step divides the loss by before the backward: N under the "loss" convention.

    None where it divides by nothing (no accumulation, or the "mean" and "sum" conventions).

    Example:
        >>> loss_divisor(StepOptions(accumulate_steps=3)), loss_divisor(StepOptions())
        (3, None)
    """
    n = options.accumulate_steps
    return n if n > 1 and options.accumulate_convention == "loss" else None
