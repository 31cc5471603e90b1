"""Schedule-Free AdamW (Defazio et al., 2024), as the ``schedulefree`` package computes it.

The optimizer keeps two sequences besides Adam's second moment: ``z``, the base sequence its
gradient steps move, and ``x``, the running average of ``z`` (each step weighted by
``k ** r * lr_max ** weight_lr_power``). The parameter is neither: it is
``y = lerp(z, x, beta1)``, the point the gradient is taken at, and ``x`` is never stored (the
step moves ``y`` as ``x`` would move it). ``x`` is the point to evaluate:
``x = lerp(y, z, 1 - 1 / beta1)``.

The package's users call ``optimizer.eval()`` before evaluating (it writes ``x`` into the
parameters) and ``optimizer.train()`` after (it writes ``y`` back: a round trip that rounds, so
``y`` moves by the last bits each time). functrain never moves ``y``: `evaluation_params` computes
``x`` out of place with the package's op, and `functrain.eval_step`, `functrain.predict` and
``TrainState.export_module`` evaluate there. A run that evaluates in between trains as one that
does not, bit for bit.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from functrain.errors import ConfigError, config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.checks import check_decay, check_positive, check_unit
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    EVALUATION_POINTS,
    FROZEN_EVALUATION_POINTS,
    Count,
    Ops,
    Rule,
    Scalar,
    active,
    at_first,
    check_package_rate,
    checked_parked,
    host_value,
    preset_transform,
)
from functrain.tree import Tree, tree_flatten, tree_unflatten

__all__ = [
    "adamw_schedule_free",
    "evaluation_params",
    "frozen_evaluation_params",
    "schedule_free_adamw_rule",
]

# the param group's numbers (`Rule.group`): the updates so far, the largest scheduled rate, the
# sum of the averaging weights; the group holds beta1 beside them (it places the evaluation point)
GROUP = {"k": 0.0, "lr_max": -1.0, "weight_sum": 0.0}


def schedule_free_adamw_rule(
    b1: float, b2: float, eps: float, warmup_steps: int, r: float, weight_lr_power: float
) -> Rule:
    """``AdamWScheduleFree.step`` of one parameter: its foreach and single-tensor paths, op for op.

    The parameter is ``y``; the moments ``z`` (the parameter's copy, taken again at the first
    update as the package takes it then) and ``exp_avg_sq``. The group's numbers (``k``,
    ``lr_max``, ``weight_sum``) advance once a step in Python floats, as the package computes
    them (`Rule.prepare`; float64 tensors where the step is traced or vmap batches them: the
    same value up to the last rounding), giving the step the warmed-up rate ``lr``, the
    averaging weight ``ckp1`` and ``y``'s step size.
    """

    def prepare(
        t: Count, h: dict[str, Scalar], group: dict[str, Any]
    ) -> tuple[dict[str, Scalar], dict[str, Any]]:
        if isinstance(group["k"], torch.Tensor) or h["lr"].tensor is not None:
            # traced, batched by vmap, or a rate a derivative reaches (through the weights too)
            return prepared_tensors(h, group)
        k = int(group["k"])
        warmup = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        rate = h["lr"].map(lambda lr: lr * warmup)
        lr_max = max(rate.value, group["lr_max"])
        weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:  # every weight 0 so far (a rate of 0)
            ckp1 = 0.0
        numbers = {
            **h,
            "lr": rate,
            "ckp1": Scalar(ckp1),
            "y_rate": rate.map(lambda lr: lr * (b1 * (1 - ckp1) - 1)),
            "bias_correction2": Scalar(1 - b2 ** (k + 1)),
        }
        return numbers, {**group, "k": k + 1, "lr_max": lr_max, "weight_sum": weight_sum}

    def prepared_tensors(
        h: dict[str, Scalar], given: dict[str, Any]
    ) -> tuple[dict[str, Scalar], dict[str, Any]]:
        """`prepare`'s arithmetic on float64 tensors (its numbers unknown on the host)."""
        group = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in given.items()}
        k = group["k"]
        warmup = torch.where(k < warmup_steps, (k + 1) / max(warmup_steps, 1), 1.0)
        lr = h["lr"].tensor
        rate = (torch.as_tensor(h["lr"].value, dtype=torch.float64) if lr is None else lr) * warmup
        lr_max = torch.maximum(rate, group["lr_max"])
        weight = torch.pow(k + 1, r) * torch.pow(lr_max, weight_lr_power)
        weight_sum = group["weight_sum"] + weight
        ckp1 = torch.where(weight_sum == 0, 0.0, weight / weight_sum)
        numbers = {
            **h,
            "lr": _read(rate),
            "ckp1": _read(ckp1),
            "y_rate": _read(rate * (b1 * (1 - ckp1) - 1)),
            "bias_correction2": _read(1 - torch.pow(b2, k + 1)),
        }
        return numbers, {**group, "k": k + 1, "lr_max": lr_max, "weight_sum": weight_sum}

    def step(
        ops: Ops, p: Any, g: Any, m: dict[str, Any], t: Count, h: dict[str, Scalar]
    ) -> tuple[Any, dict[str, Any]]:
        # the package copies the parameter into z at its first update
        if isinstance(t, int):
            z = ops.copy(m["z"], p) if t == 1 else m["z"]
        else:
            z = at_first(t, p, lambda: m["z"])
        v = ops.addcmul(ops.mul(m["exp_avg_sq"], b2), g, g, value=1 - b2)
        denom = ops.add(ops.sqrt(ops.out.div(v, h["bias_correction2"])), eps)
        normalized = ops.out.div(g, denom)  # (the package divides the gradient in place)
        decay = h["weight_decay"]
        if active(decay):  # (at y, before y moves)
            normalized = ops.add(normalized, p, decay)
        y = ops.add(ops.lerp(p, z, h["ckp1"]), normalized, h["y_rate"])
        return y, {"z": ops.sub(z, normalized, h["lr"]), "exp_avg_sq": v}

    return Rule(
        ("z", "exp_avg_sq"),
        {},
        ("lr", "weight_decay"),
        step,
        copies=("z",),
        group={**GROUP, "beta1": b1},
        prepare=prepare,
        foreach=True,
        refuses_complex="the schedulefree package steps a complex parameter in complex "
        "arithmetic (its second moment the complex square g * g, not |g| ** 2, as torch.optim "
        "takes it); train the real and imaginary parts as real parameters (torch.view_as_real)",
    )


# the updates a run may take whose averaging weight `adamw_schedule_free` keeps finite
_HORIZON = 10**9


@named
def adamw_schedule_free(
    lr: LearningRate = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> Transform:
    """Schedule-Free AdamW (Defazio et al., 2024): AdamW without a decaying schedule.

    Matches ``schedulefree.AdamWScheduleFree`` (foreach and single-tensor, which give the same
    bits) bit for bit in float32 and float64, with weight decay, warmup and a learning-rate
    schedule. Its state holds the param group's numbers (the update count ``k``, ``lr_max``,
    ``weight_sum``): a checkpoint resumes exactly. The package's ``train()`` / ``eval()`` calls
    have no counterpart: the parameters stay the training point ``y``, and `functrain.eval_step`,
    `functrain.predict` and ``TrainState.export_module`` evaluate at ``x`` (`evaluation_params`).

    Args:
        lr: learning rate, a float or a schedule (the package's ``lr`` as a torch LR scheduler
            writes it into the param group; the warmup multiplies it).
        betas: ``(b1, b2)``: the interpolation between the average and the base sequence (in
            (0, 1): ``x`` is found from ``y`` by dividing by it), and the second moment's decay.
        eps: added to the second moment's square root.
        weight_decay: L2 coefficient, added to the normalized gradient at ``y``.
            A number, or a schedule read at the count as a scheduled `lr` is.
        warmup_steps: the rate rises linearly over this many first updates.
        r: the averaging weights grow as ``k ** r``.
        weight_lr_power: the averaging weights are ``lr_max ** weight_lr_power``.

    Returns:
        A `Transform` emitting the new parameters.

    Raises:
        ConfigError: a hyperparameter is out of range, or `lr` is a tensor (the package's tensor
            rate computes its weights in tensors, other bits: give ``float(lr)``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = adamw_schedule_free(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> new, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, new)["w"]
        tensor([0.9000])
    """
    problems: list[str] = []
    check_package_rate(problems, lr, "schedulefree")
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        problems.append(f"betas must be a pair (b1, b2), got betas={betas!r}")
        b1, b2 = 0.9, 0.999
    else:
        b1, b2 = betas
        check_unit(problems, "betas[0]", b1, closed_low=False)
        check_unit(problems, "betas[1]", b2)
    check_positive(problems, "eps", eps, allow_zero=True)
    check_decay(problems, "weight_decay", weight_decay)
    if not (isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool)) or (
        warmup_steps < 0
    ):
        problems.append(
            f"warmup_steps must be an int >= 0 (updates of linear warmup), got "
            f"warmup_steps={warmup_steps!r}"
        )
    check_positive(problems, "r", r, allow_zero=True)
    if isinstance(r, (int, float)) and r * math.log(_HORIZON + 1) >= math.log(sys.float_info.max):
        # the package computes (k + 1) ** r in Python floats and raises OverflowError mid-run
        largest = math.log(sys.float_info.max) / math.log(_HORIZON + 1)
        problems.append(
            f"r must keep the averaging weight (k + 1) ** r finite for {_HORIZON:.0e} updates "
            f"(r < {largest:.2f}), got r={r!r}"
        )
    check_positive(problems, "weight_lr_power", weight_lr_power, allow_zero=True)
    config_check(problems, "adamw_schedule_free")
    rule = schedule_free_adamw_rule(b1, b2, eps, warmup_steps, r, weight_lr_power)
    # over the parameters' lists, one foreach kernel per op: the package's default path (its
    # in-place foreach products round bfloat16 and float16 otherwise than its per-tensor loop)
    return preset_transform(
        rule, "adamw_schedule_free", lr, {"weight_decay": weight_decay}, foreach=True
    )


def evaluation_params(opt_state: Any, params: Tree) -> Tree | None:
    """The point a schedule-free optimizer's model is evaluated at: the average ``x``.

    ``torch.lerp(y, z, 1 - 1 / beta1)`` of each parameter ``y`` and its ``z``, out of place: the
    bits ``AdamWScheduleFree.eval()`` writes into the parameters. Before the first update, the
    parameters themselves (the package has no ``z`` yet and leaves them).

    Args:
        opt_state: an optimizer state, the schedule-free one's own or one holding it (a chain's,
            ``skip_nonfinite``'s: any tuple).
        params: the parameters `opt_state` was updated with (``y``).

    Returns:
        The evaluation point, a tree like `params`; None where `opt_state` holds no
        schedule-free state.

    Raises:
        ConfigError: the schedule-free state holds moments of other parameters than `params`
            (it was given part of them, by ``masked`` or ``partition``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = adamw_schedule_free(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> state = tx.init(p)
        >>> for g in (1.0, -1.0):
        ...     new, state = tx.update({"w": torch.tensor([g])}, state, p)
        ...     p = ft.apply_updates(p, new)
        >>> p["w"], evaluation_params(state, p)["w"]
        (tensor([0.9550]), tensor([0.9500]))
        >>> evaluation_params(ft.sgd(0.1).init(p), p) is None
        True
    """
    found = _schedule_free_state(opt_state)
    if found is None:
        return None
    ys, spec = tree_flatten(params)
    zs = found.slots["z"]
    if len(ys) != len(zs) or any(y.shape != z.shape for y, z in zip(ys, zs, strict=False)):
        raise ConfigError(
            "adamw_schedule_free's evaluation point needs the moments of every parameter, and "
            f"its state holds {len(zs)} for {len(ys)} parameters (of shapes "
            f"{[tuple(z.shape) for z in zs]} for {[tuple(y.shape) for y in ys]}); give "
            "adamw_schedule_free all the parameters (not through masked or partition)"
        )
    if not found.group["k"].any():
        return params
    weight = _average_weight(found)
    return tree_unflatten([torch.lerp(y, z, weight) for y, z in zip(ys, zs, strict=True)], spec)


def _average_weight(found: Any) -> float:
    """How far the evaluation point lies from ``y`` toward ``z``: ``1 - 1 / beta1``, held on
    the host (a read that waits for nothing; a stacked state's members share beta1, as
    functrain.stack requires)."""
    return 1 - 1 / float(found.group["beta1"].reshape(-1)[0])


def frozen_evaluation_params(
    opt_state: Any, frozen: dict[str, torch.Tensor], parked: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor] | None:
    """The frozen weights a schedule-free model is evaluated at: a weight that trained and waits
    (its ``z`` parked with it) at its own average, as the package's ``eval()`` moves every
    weight that has a ``z``; the others where they stand. None where none is schedule-free's.

    Example:
        >>> import torch, functrain as ft
        >>> state = adamw_schedule_free(lr=0.1).init({"w": torch.ones(1)})
        >>> parked = {"v": {"opt_state|slots/z|": torch.zeros(1)}}
        >>> state = state._replace(group={**state.group, "k": torch.tensor(1.0)})
        >>> frozen_evaluation_params(state, {"v": torch.ones(1)}, parked)
        {'v': tensor([1.1111])}
    """
    found = _schedule_free_state(opt_state)
    if found is None or not parked or not found.group["k"].any():
        return None
    weight = _average_weight(found)
    out, moved = dict(frozen), False
    for name, y in frozen.items():
        for key, z in parked.get(name, {}).items():
            what, _, container = key.partition("|")
            if what == "opt_state" and container.split("|")[0].endswith("slots/z"):
                z = checked_parked(z, y, name, key)
                out[name], moved = torch.lerp(y, z, weight), True
    return out if moved else None


def _read(t: torch.Tensor) -> Scalar:
    """A step's number computed as a float64 tensor: the number torch's kernels take, where it
    can be read (an eager step whose rate a derivative reaches: IEEE operations on doubles, the
    float path's bits), and the tensor a derivative follows."""
    return Scalar(host_value(t), t)


def _schedule_free_state(node: Any) -> Any:
    """The schedule-free state inside a (wrapped) optimizer state: the one whose group holds the
    schedule-free numbers and whose moments include ``z``."""
    group = getattr(node, "group", None)  # (a formula's state, or its differentiable form's)
    if isinstance(group, dict):
        return node if group.keys() == _NUMBERS and "z" in node.slots else None
    if isinstance(node, tuple | list):  # (a tensor, the usual leaf, is neither)
        for child in node:
            if type(child) is not torch.Tensor:
                found = _schedule_free_state(child)
                if found is not None:
                    return found
    return None


_NUMBERS = {*GROUP, "beta1"}


EVALUATION_POINTS.append(evaluation_params)
FROZEN_EVALUATION_POINTS.append(frozen_evaluation_params)
