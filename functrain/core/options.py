"""The step's static options (`StepOptions`) and the transform they make of the user's optimizer.

`TrainState.create` gathers its keyword options into a `StepOptions`, checks them (`problems`),
and wraps the user's optimizer with `build_transform`: clipping, skipping non-finite updates (or
dynamic loss scaling for fp16), and accumulation, in the one order that keeps their meaning.
"""

from __future__ import annotations

from typing import Literal

import attrs

from functrain.optim.averaging import EmaConvention, ema_problems
from functrain.optim.base import Transform
from functrain.optim.combine import chain
from functrain.optim.rules.clipping import clip_by_global_norm
from functrain.optim.wrappers import accumulate, dynamic_loss_scale, skip_nonfinite

__all__ = [
    "StepOptions",
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
    accumulate_convention: AccumulateConvention = "loss"
    # steps that autograd and torch.func differentiate (`functrain.optim.differentiable`): True
    # (exactly) or "first_order" (through the updates, the gradients taken as constants)
    differentiable: Differentiable = False

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
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            problems.append(
                f"clip_grad_norm must be > 0 or None, got clip_grad_norm={self.clip_grad_norm!r}"
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
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append(
                f"ema_decay must lie in [0, 1) or be None, got ema_decay={self.ema_decay!r}"
            )
        return problems + self._ema_problems() + self._differentiable_problems()

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
        return ema_problems(
            # ema_decay's own check is above: here it bounds min_decay, where it is valid
            self.ema_decay if 0.0 <= self.ema_decay < 1.0 else 0.5,
            self.ema_warmup,
            self.ema_convention,
            self.ema_buffers,
            self.ema_update_after_step,
            self.ema_warmup_power,
            self.ema_warmup_gamma,
            self.ema_min_decay,
            prefix="ema_",
        )


def ema_buffers_default(convention: str) -> bool:
    """Whether a convention averages the buffers unless told: timm's ``ModelEmaV3`` does
    (``exclude_buffers=False``); torch's `AveragedModel` does not (``use_buffers=False``), nor
    functrain's own EMA."""
    return convention == "timm"


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
        tx = dynamic_loss_scale(tx)
        if options.max_consecutive_nonfinite is not None:
            tx = skip_nonfinite(tx, max_consecutive=options.max_consecutive_nonfinite)
    elif options.nonfinite in ("skip", "halt"):
        cap = 0 if options.nonfinite == "halt" else options.max_consecutive_nonfinite
        tx = skip_nonfinite(tx, max_consecutive=cap)
    if options.accumulate_steps > 1:
        reduce = "mean" if options.accumulate_convention == "mean" else "sum"
        tx = accumulate(tx, options.accumulate_steps, reduce=reduce)
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
