"""Moving a run between `torch.optim` and functrain, bit for bit.

`from_torch_optimizer` reads a live `torch.optim` optimizer (its parameter groups and per-parameter
state) and gives the matching functrain transform, one per group (joined by `partition`), with the
state torch reached; `ConvertedOptimizer.create_state` builds the `TrainState` that continues the
run. `to_torch_state_dict` goes the other way: a functrain state as the ``state_dict`` that the
matching torch optimizer loads and continues from.

Which torch implementation a functrain transform continues bit for bit (float32, CPU, measured):

* `torch.optim.SGD` / `Adam` / `AdamW` / `Adagrad` with ``fused=True``: functrain's
  ``sgd/adam/adamw/adagrad(fused=True)`` (the defaults; SGD with dampening runs its foreach form).
* with ``foreach=True``, or torch's CPU default (the single-tensor loop, which gives the same bits
  as foreach for these five classes): ``sgd/adam/adamw/adagrad(fused=False)``, `rmsprop`.

`from_torch_optimizer` picks that configuration from the group's ``fused`` flag. Supported:
`torch.optim.SGD`, `Adam`, `AdamW`, `RMSprop`, `Adagrad` (their single-tensor and foreach
implementations agree bit for bit, and functrain's presets reproduce them); other optimizers (for
`RAdam` the single-tensor loop and foreach differ in the last bits) raise a `ConfigError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn
from torch.optim import lr_scheduler

from functrain.core.state import TrainState
from functrain.errors import ConfigError, config_check
from functrain.optim.fused import FusedAdagradState, FusedAdamState, FusedSgdState
from functrain.optim.presets import adagrad, adam, adamw, rmsprop, sgd
from functrain.optim.primitives import ScaleByAdagradState, ScaleByAdamState, ScaleByLearningRateState, ScaleByRmsState, TraceState
from functrain.optim.schedules import Schedule, from_torch
from functrain.optim.transform import Transform, walk_states
from functrain.optim.wrappers import PartitionState, partition

__all__ = ["ConvertedOptimizer", "from_torch_optimizer", "to_torch_state_dict"]

LearningRates = float | Schedule | Sequence[float | Schedule] | None
_KINDS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)
# where torch keeps what each functrain state holds: {state class: {field: torch's per-parameter key}}
_KEYS: dict[type, dict[str, str]] = {
    FusedAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ScaleByRmsState: {"nu": "square_avg", "mu": "grad_avg"},
    ScaleByAdagradState: {"sum_of_squares": "sum"},
    FusedAdagradState: {"sum_of_squares": "sum"},
    TraceState: {"trace": "momentum_buffer"},
    FusedSgdState: {"momentum": "momentum_buffer"},
    ScaleByLearningRateState: {},
}
# the state each torch class needs in the functrain transform (one of them)
_NEEDS: dict[type, tuple[type, ...]] = {
    torch.optim.Adam: (FusedAdamState, ScaleByAdamState),
    torch.optim.RMSprop: (ScaleByRmsState,),
    torch.optim.Adagrad: (FusedAdagradState, ScaleByAdagradState),
    torch.optim.SGD: (),
}


class _Group(NamedTuple):
    """One torch parameter group as functrain sees it."""

    names: tuple[str, ...]  # its parameters, in the order torch lists them
    state: tuple[dict[str, Any], ...]  # torch's per-parameter state, the same order
    count: int  # the updates its parameters have taken
    lr: float  # the group's current lr


@attrs.frozen
class ConvertedOptimizer:
    """A torch optimizer's run as functrain takes it over (made by `from_torch_optimizer`).

    Attributes:
        optimizer: the functrain transform matching the torch optimizer, one preset per parameter
            group (joined by `partition`, labels ``"group0"``, ``"group1"``, ...).
        step: the updates torch took (its state's ``step``; for `SGD`, which keeps none, the
            ``step`` given to `from_torch_optimizer`).
        names: the parameters the torch optimizer updates (those with ``requires_grad``), by their
            names in the module.
        groups: torch's groups as read: names, per-parameter state (torch's own tensors, copied
            only by `load_into`), count and lr.
    """

    optimizer: Transform
    step: int
    names: tuple[str, ...]
    groups: tuple[_Group, ...] = attrs.field(repr=False)

    def create_state(self, module: nn.Module, loss_fn: Callable[..., Any], **options: Any) -> TrainState:
        """`TrainState.create` for `module` with this optimizer, then `load_into`.

        Parameters the torch optimizer does not hold are frozen (``trainable=``), and the state's
        ``step`` counter starts at `step`. `options` are `TrainState.create`'s other arguments.

        Raises:
            ConfigError: as `TrainState.create`, or `module` is not the torch optimizer's.
        """
        held = frozenset(self.names)
        if "trainable" in options:
            config_check(["trainable is set by the torch optimizer's parameters; leave it out"], "create_state")
        state = TrainState.create(module, self.optimizer, loss_fn, trainable=lambda name, p: name in held, **options)
        return self.load_into(state)

    def load_into(self, state: TrainState) -> TrainState:
        """`state` with torch's optimizer state (moments, momentum buffers, counts) in place of its own.

        Args:
            state: a state created with `optimizer` (and any `TrainState.create` options).

        Raises:
            ConfigError: `state` was not created with this `optimizer`, or a parameter differs in
                shape from torch's state.
        """
        if state.optimizer is not self.optimizer:
            config_check(["the state was not created with this converted optimizer: use create_state(module, loss_fn)"], "load_into")
        missing = sorted(set(self.names) - set(state.params))
        if missing:
            config_check([f"the state trains none of {', '.join(missing)}, which the torch optimizer holds"], "load_into")
        opt_state = _map_groups(state.opt_state, len(self.groups), lambda k, node: _filled(node, self.groups[k], state.params))
        step = torch.full_like(state.step, self.step)
        return state.replace(opt_state=opt_state, step=step)


def from_torch_optimizer(
    optimizer: torch.optim.Optimizer, module: nn.Module, *, lr: LearningRates = None, step: int | None = None, scheduler: Any = None
) -> ConvertedOptimizer:
    """The functrain optimizer, and state, that continue a `torch.optim` run bit for bit.

    Each parameter group becomes the matching preset with the group's hyperparameters (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``momentum``, ``dampening``, ``nesterov``,
    ``alpha``, ``centered``, ``lr_decay``, ``initial_accumulator_value``),
    ``fused`` as the group has it (see the module docstring for which torch implementation each
    functrain configuration reproduces); several groups are joined by `partition`. The state (moments,
    momentum buffers, step counts) is read when the `TrainState` is built
    (`ConvertedOptimizer.create_state`), so build it right after converting.

    The step counter of the transform starts at torch's count, so a schedule given as `lr`
    continues where torch's scheduler is, when the scheduler steps once per optimizer step: pass
    ``lr=functrain.schedules.from_torch(<the scheduler's class>, lr=<initial lr>, ...)``.

    Args:
        optimizer: a live `torch.optim.SGD`, `Adam`, `AdamW`, `RMSprop` or `Adagrad`.
        module: the module whose parameters it updates (their names key the functrain state).
        lr: None: each group's current ``lr``, held constant; a float or schedule for every group;
            or one per group.
        step: the updates taken, for `SGD`, whose state keeps no count (None: 0 without momentum
            buffers, else 1, enough for a constant lr); checked against the count of the others.
        scheduler: instead of `lr`, the live torch scheduler of `optimizer` (stepped once per
            optimizer step): its class and arguments are read back and rebuilt with
            `functrain.schedules.from_torch` from each group's ``initial_lr`` (`StepLR`,
            `MultiStepLR`, `ExponentialLR`, `CosineAnnealingLR`, `LinearLR`, `ConstantLR`,
            `PolynomialLR`, `CosineAnnealingWarmRestarts`, `LambdaLR`, and `SequentialLR` and
            `ChainedScheduler` of them, members taken as built in list order; others: pass `lr`).

    Returns:
        A `ConvertedOptimizer`.

    Raises:
        ConfigError: the optimizer is of another class, a setting has no functrain equivalent
            (a flag the preset does not take), a parameter is not the
            module's, parameters of one group took different numbers of steps, or the scheduler
            cannot be read back or stepped a different number of times.

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> run = ft.from_torch_optimizer(opt, model)
        >>> state = run.create_state(model, lambda m, b: m(b).sum())
        >>> run.step, run.names, int(state.step)
        (1, ('weight', 'bias'), 1)
        >>> run.optimizer.name
        'adamw(lr=0.01, b1=0.9, b2=0.999, eps=1e-08, weight_decay=0.01, amsgrad=False, mask=None)'
    """
    where = "from_torch_optimizer"
    if not isinstance(optimizer, _KINDS) or not isinstance(module, nn.Module):
        names = ", ".join(f"torch.optim.{k.__name__}" for k in _KINDS)
        config_check([f"optimizer must be a live {names} and module an nn.Module, got {type(optimizer).__name__}, {type(module).__name__}"], where)
    if scheduler is not None and lr is not None:
        config_check(["pass lr= or scheduler=, not both"], where)
    rates = _rates(lr, len(optimizer.param_groups), where)
    groups = [_read_group(optimizer, k, module, where) for k in range(len(optimizer.param_groups))]
    counts = _counts(optimizer, groups, step, where)
    if scheduler is not None:
        rates = _scheduled(scheduler, optimizer, counts, where)
    groups = [g._replace(count=c) for g, c in zip(groups, counts, strict=True)]
    transforms = [_transform(optimizer, group, g, rate, f"{where}, param_groups[{k}]") for k, (group, g, rate) in enumerate(zip(optimizer.param_groups, groups, rates, strict=True))]
    if len(transforms) == 1:
        tx = transforms[0]
    else:
        label = {name: f"group{k}" for k, g in enumerate(groups) for name in g.names}
        tx = partition(lambda name, p: label.get(name, "unheld"), **{f"group{k}": t for k, t in enumerate(transforms)})
    return ConvertedOptimizer(tx, max(counts), tuple(n for g in groups for n in g.names), tuple(groups))


_LIVE_ARGS: dict[type, tuple[str, ...]] = {
    lr_scheduler.StepLR: ("step_size", "gamma"),
    lr_scheduler.ExponentialLR: ("gamma",),
    lr_scheduler.CosineAnnealingLR: ("T_max", "eta_min"),
    lr_scheduler.LinearLR: ("start_factor", "end_factor", "total_iters"),
    lr_scheduler.ConstantLR: ("factor", "total_iters"),
    lr_scheduler.PolynomialLR: ("total_iters", "power"),
    lr_scheduler.CosineAnnealingWarmRestarts: ("T_0", "T_mult", "eta_min"),
}


def _described_scheduler(scheduler: Any, k: int, where: str) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for `from_torch`, read from a live scheduler, for parameter group `k`."""
    cls = type(scheduler)
    if cls in _LIVE_ARGS:
        return cls, {name: getattr(scheduler, name) for name in _LIVE_ARGS[cls]}
    if cls is lr_scheduler.MultiStepLR:
        return cls, {"milestones": sorted(scheduler.milestones.elements()), "gamma": scheduler.gamma}
    if cls is lr_scheduler.LambdaLR:
        return cls, {"lr_lambda": scheduler.lr_lambdas[k]}
    if cls is lr_scheduler.SequentialLR:
        members = [_described_scheduler(s, k, where) for s in scheduler._schedulers]
        return cls, {"schedulers": members, "milestones": list(scheduler._milestones)}
    if cls is lr_scheduler.ChainedScheduler:
        return cls, {"schedulers": [_described_scheduler(s, k, where) for s in scheduler._schedulers]}
    fix = f"pass lr=functrain.schedules.from_torch({cls.__name__}, lr=..., <its arguments>) instead"
    config_check([f"a live {cls.__name__} cannot be read back into its arguments; {fix}"], where)
    raise AssertionError  # unreachable: config_check raised


def _scheduled(scheduler: Any, optimizer: torch.optim.Optimizer, counts: Sequence[int], where: str) -> list[Schedule]:
    """One schedule per group: the live scheduler's class and arguments from its base lrs, at the optimizer's count."""
    if getattr(scheduler, "optimizer", None) is not optimizer:
        config_check(["scheduler must be a torch.optim.lr_scheduler scheduler of this optimizer"], where)
    steps = getattr(scheduler, "last_epoch", None)
    if steps is not None and any(steps != count for count in counts):
        problem = f"the scheduler stepped {steps} times, the optimizer {max(counts)}: functrain runs a schedule on the update count"
        config_check([f"{problem}; step the scheduler once per optimizer step, or pass lr= yourself"], where)
    schedules = []
    for k, group in enumerate(optimizer.param_groups):
        cls, kwargs = _described_scheduler(scheduler, k, where)
        schedules.append(from_torch(cls, lr=group["initial_lr"], **kwargs))
    return schedules


def _rates(lr: LearningRates, n: int, where: str) -> list[float | Schedule | None]:
    if lr is None or callable(lr) or isinstance(lr, int | float):
        return [lr] * n
    if isinstance(lr, Sequence) and len(lr) == n:
        return list(lr)
    config_check([f"lr must be None, a float, a schedule or one per parameter group ({n}), got lr={lr!r}"], where)
    raise AssertionError  # unreachable: config_check raised


def _read_group(optimizer: torch.optim.Optimizer, k: int, module: nn.Module, where: str) -> _Group:
    by_id = {id(p): name for name, p in module.named_parameters()}
    group = optimizer.param_groups[k]
    unknown = [i for i, p in enumerate(group["params"]) if id(p) not in by_id]
    if unknown:
        config_check([f"param_groups[{k}]['params'][{unknown[0]}] is not a parameter of the module given"], where)
    held = [p for p in group["params"] if p.requires_grad]  # torch never steps a frozen one: nor does functrain
    names = tuple(by_id[id(p)] for p in held)
    state = tuple(dict(optimizer.state.get(p, {})) for p in held)
    return _Group(names, state, 0, float(group["lr"]))


def _counts(optimizer: torch.optim.Optimizer, groups: Sequence[_Group], step: int | None, where: str) -> list[int]:
    """Each group's count of updates: Adam's ``step`` (one value per group), SGD's from `step`."""
    counts = []
    for k, g in enumerate(groups):
        if not isinstance(optimizer, torch.optim.SGD):  # the others count steps per parameter
            seen = {int(s["step"]) if "step" in s else None for s in g.state}
            if len(seen) > 1:
                shown = sorted(str(s) for s in seen)
                config_check([f"param_groups[{k}]: its parameters took different numbers of steps ({', '.join(shown)}: some had no gradient); functrain updates a group together"], where)
            count = seen.pop() or 0
            if step is not None and step != count:
                config_check([f"step={step!r} disagrees with param_groups[{k}]'s state, which took {count} steps"], where)
        else:
            buffers = [s.get("momentum_buffer") is not None for s in g.state]
            if any(buffers) and not all(buffers):
                config_check([f"param_groups[{k}]: some parameters have a momentum buffer and others not (some had no gradient); functrain updates a group together"], where)
            count = step if step is not None else int(any(buffers))
        counts.append(count)
    return counts


def _transform(optimizer: torch.optim.Optimizer, group: dict[str, Any], g: _Group, rate: Any, where: str) -> Transform:
    """The preset that matches one parameter group."""
    preset, kwargs = _preset(optimizer, group)
    kwargs["lr"] = g.lr if rate is None else rate
    accepted = inspect.signature(preset).parameters
    problems = []
    for flag in ("fused", "maximize"):
        value = bool(group.get(flag))
        if flag in accepted:
            kwargs[flag] = value  # fused=False for torch's default: the foreach chain its single-tensor code matches
        elif value:
            fix = "build the torch optimizer without it (foreach=True or the default)" if flag == "fused" else "minimize the negated loss instead"
            problems.append(f"functrain converts no {flag}=True {preset.__name__}; {fix}")
    config_check(problems, where)
    return preset(**kwargs)


def _preset(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[Callable[..., Transform], dict[str, Any]]:
    """The functrain preset for the optimizer's class, and the group's settings under its names."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is Adam with decoupled_weight_decay
        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        b1, b2 = group["betas"]
        settings = dict(b1=float(b1), b2=float(b2), eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"])
        return (adamw if decoupled else adam), settings
    if isinstance(optimizer, torch.optim.RMSprop):
        return rmsprop, dict(alpha=group["alpha"], eps=group["eps"], momentum=group["momentum"], centered=group["centered"], weight_decay=group["weight_decay"])
    if isinstance(optimizer, torch.optim.Adagrad):
        return adagrad, dict(eps=group["eps"], lr_decay=group["lr_decay"], initial_accumulator_value=group["initial_accumulator_value"], weight_decay=group["weight_decay"])
    return sgd, dict(momentum=group["momentum"], nesterov=group["nesterov"], dampening=group["dampening"], weight_decay=group["weight_decay"])


def _map_groups(opt_state: Any, n: int, fn: Callable[[int, Any], Any]) -> Any:
    """`opt_state` with ``fn(k, node)`` applied to every node of group ``k``'s state (one group without a partition)."""

    def walk(node: Any, k: int | None) -> Any:
        if isinstance(node, PartitionState) and k is None:
            if len(node.inner) != n:
                raise ConfigError(f"the state's optimizer has {len(node.inner)} parameter groups, the torch optimizer {n}")
            return PartitionState(tuple(walk(inner, i) for i, inner in enumerate(node.inner)))
        if isinstance(node, torch.Tensor):
            return node
        node = fn(k or 0, node) if (k is not None or n == 1) else node
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(child, k) for child in node))
        if isinstance(node, tuple | list):
            return type(node)(walk(child, k) for child in node)
        if isinstance(node, dict):
            return {key: walk(child, k) for key, child in node.items()}
        return node

    out = walk(opt_state, None)
    if n > 1 and not any(isinstance(node, PartitionState) for node in _nodes(opt_state)):
        raise ConfigError(f"the torch optimizer has {n} parameter groups, the state's optimizer one: convert that optimizer with from_torch_optimizer")
    return out


def _nodes(tree: Any) -> list[Any]:
    return list(walk_states(tree))


def _order(group: _Group, params: dict[str, torch.Tensor]) -> list[str]:
    """The group's parameters in the order functrain's state holds them (the state's own)."""
    held = set(group.names)
    return [name for name in params if name in held]


def _torch_tensors(group: _Group, names: Sequence[str], key: str, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    by_name = dict(zip(group.names, group.state, strict=True))
    out = []
    for name, target in zip(names, like, strict=True):
        value = by_name[name][key]
        if value.shape != target.shape:
            raise ConfigError(f"torch's {key} of {name} has shape {tuple(value.shape)}, the state's parameter {tuple(target.shape)}")
        out.append(value.detach().to(dtype=target.dtype, device=target.device, copy=True))
    return tuple(out)


def _filled(node: Any, group: _Group, params: dict[str, torch.Tensor]) -> Any:
    """A node of a group's state with torch's values in it (nodes of other kinds as they are)."""
    if group.count == 0 or type(node) not in _KEYS:
        return node
    names = _order(group, params)
    values = {field: _torch_tensors(group, names, key, getattr(node, field)) for field, key in _KEYS[type(node)].items() if getattr(node, field)}
    if "count" in node._fields:
        values["count"] = torch.full_like(node.count, group.count)
    return node._replace(**values)


def to_torch_state_dict(state: TrainState, optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """A functrain state's optimizer state as the ``state_dict`` of `optimizer`, to load and continue in torch.

    `optimizer` is the torch optimizer that matches the state's transform: the same class and
    hyperparameters, one parameter group per `partition` group (one group for a plain preset), built
    over `module`'s parameters (e.g. ``state.export_module()``). Its own state is not read or
    changed: ``optimizer.load_state_dict(to_torch_state_dict(state, optimizer, module))`` then
    continues the run, bit for bit when `optimizer`'s implementation is the one the transform
    reproduces (``fused=True`` for functrain's fused SGD, Adam and Adagrad, the defaults; the default or
    ``foreach=True`` for ``fused=False``;
    see the module docstring). The group settings (lr, ...) are `optimizer`'s: to continue a schedule
    with a torch scheduler, bring the scheduler (and so the groups' lr) to the state's count before
    exporting.

    Args:
        state: a `TrainState` whose optimizer is `sgd`, `adam`, `adamw`, `rmsprop` or `adagrad` (or a
            `partition` of them).
        optimizer: a `torch.optim.SGD`, `Adam`, `AdamW`, `RMSprop` or `Adagrad` over `module`'s parameters.
        module: the module holding `optimizer`'s parameters, named as in ``state.params``.

    Returns:
        ``{"state": {index: {...}}, "param_groups": [...]}`` as `optimizer.state_dict` lays it out
        (tensors are copies).

    Raises:
        ConfigError: the optimizer's class or groups do not match the state's transform, or a
            parameter is not in the state.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), lambda m, b: m(b).sum())
        >>> state, _ = ft.train_step(state, torch.ones(2, 3))
        >>> model = state.export_module().train()
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        >>> opt.load_state_dict(ft.to_torch_state_dict(state, opt, model))
        >>> opt.state[model.weight]["step"]
        tensor(1.)
    """
    where = "to_torch_state_dict"
    if not isinstance(optimizer, _KINDS) or not isinstance(module, nn.Module):
        names = ", ".join(f"torch.optim.{k.__name__}" for k in _KINDS)
        config_check([f"optimizer must be a live {names} and module an nn.Module, got {type(optimizer).__name__}, {type(module).__name__}"], where)
    n = len(optimizer.param_groups)
    found: list[dict[type, Any]] = [{} for _ in range(n)]

    def record(k: int, node: Any) -> Any:
        if type(node) in _KEYS:
            found[k].setdefault(type(node), node)
        return node

    _map_groups(state.opt_state, n, record)
    layout = optimizer.state_dict()
    out: dict[int, dict[str, Any]] = {}
    for k in range(n):
        group = _read_group(optimizer, k, module, where)
        missing = [name for name in group.names if name not in state.params]
        if missing:
            config_check([f"param_groups[{k}] holds {', '.join(missing)}, which the state does not train"], where)
        held = set(group.names)
        order = [name for name in state.params if name in held]
        values = _group_values(optimizer, optimizer.param_groups[k], found[k], f"{where}, param_groups[{k}]")
        by_id = {id(p): i for p, i in zip(optimizer.param_groups[k]["params"], layout["param_groups"][k]["params"], strict=True)}
        params = dict(module.named_parameters())
        indices = {name: by_id[id(params[name])] for name in group.names}
        for i, name in enumerate(order):
            entry = {key: (v[i].detach().clone() if isinstance(v, tuple) else v.clone()) for key, v in values.items()}
            if entry:
                out[indices[name]] = entry
    return {"state": out, "param_groups": layout["param_groups"]}


def _group_values(optimizer: torch.optim.Optimizer, group: dict[str, Any], nodes: dict[type, Any], where: str) -> dict[str, Any]:
    """torch's per-parameter state of one group (a tuple over its parameters, or one tensor for all)."""
    kind = next(k for k in _NEEDS if isinstance(optimizer, k))
    own = [cls for cls in nodes if cls in _NEEDS[kind]]
    foreign = sorted({cls.__name__ for need in _NEEDS.values() for cls in need if cls in nodes and cls not in _NEEDS[kind]})
    momentum = group.get("momentum", 0) != 0
    problems = []
    if _NEEDS[kind] and not own or foreign:
        problems.append(f"torch's {type(optimizer).__name__} does not match the state's optimizer (which holds {', '.join(foreign) or 'no ' + _NEEDS[kind][0].__name__})")
    has_buffer = TraceState in nodes or bool(getattr(nodes.get(FusedSgdState), "momentum", ()))
    if "momentum" in group and momentum != has_buffer:
        problems.append(f"momentum={group['momentum']!r} in torch, but the state's optimizer has {'a' if has_buffer else 'no'} momentum buffer")
    for flag, cls, field in (("amsgrad", own[0] if own else None, "nu_max"), ("centered", ScaleByRmsState, "mu")):
        if flag in group and cls in nodes and bool(group[flag]) != bool(getattr(nodes[cls], field)):
            problems.append(f"{flag}={group[flag]!r} in torch, but not in the state's optimizer")
    config_check(problems, where)
    counted = [node for node in nodes.values() if "count" in node._fields]
    count = int(counted[0].count) if counted else 0
    if count == 0 and kind is not torch.optim.Adagrad:  # torch makes the state at the first step (Adagrad at construction)
        return {}
    values: dict[str, Any] = {} if kind is torch.optim.SGD else {"step": counted[0].count.to(device="cpu", dtype=torch.float32)}
    for node in nodes.values():
        values.update({key: getattr(node, field) for field, key in _KEYS[type(node)].items() if getattr(node, field)})
    return values
