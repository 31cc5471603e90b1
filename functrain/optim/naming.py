"""Names of transforms and schedules: the call that built them, e.g. ``adamw(lr=0.001, ...)``.

The name shows in a `TrainState`'s repr and in a checkpoint's fingerprint, where a different
optimizer or hyperparameter is reported on load. A named transform also keeps the call itself
(`recorded_call`), so that one like it with other hyperparameters can be made again (`Call.again`:
`functrain.stack` gives K members differing in their learning rate one optimizer that sweeps it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.rates import RATE_ARGUMENTS, as_tensor_steps, function_name, is_plain_function

__all__ = [
    "Call",
    "named",
    "recorded_call",
    "held_transforms",
    "describe_call",
    "describe_value",
    "as_saved",
    "saved_conventions",
    "chosen_conventions",
    "function_rates",
    "function_choices",
    "FUNCTION_RATES",
]

# the arguments that take a function of each parameter, ``(path, param) -> decision``: a mask's
# ``bool``, a partition's group name
_CHOICE_ARGUMENTS = ("mask", "labels")

# the attribute of a named transform's update function that keeps its calls, by name
_CALLS = "_functrain_calls"


class Call(NamedTuple):
    """The call of a named factory that built a transform: the factory and its bound arguments."""

    factory: Callable[..., Transform]  # as decorated: what it builds again is named too
    signature: inspect.Signature
    arguments: dict[str, Any]  # every parameter, defaults applied, in the signature's order
    # the arguments as the name shows them: rewritten by the factory's `resolve` (torch's
    # implementation choices, which change no number, left out)
    shown: dict[str, Any]

    def again(self, **changes: Any) -> Transform:
        """The factory called with these arguments, `changes` replacing some of them."""
        bound = inspect.BoundArguments(self.signature, {**self.arguments, **changes})
        return self.factory(*bound.args, **bound.kwargs)


def recorded_call(transform: Transform) -> Call | None:
    """The call that built `transform`, if a factory decorated with `named` built it.

    None for a transform built otherwise (``Transform(init, update)``), or renamed since.

    Example:
        >>> import functrain as ft
        >>> call = recorded_call(ft.sgd(0.1, momentum=0.9))
        >>> call.arguments["momentum"], call.again(lr=0.2).name[:27]
        (0.9, 'sgd(lr=0.2, momentum=0.9, n')
    """
    calls = getattr(getattr(transform, "update", None), _CALLS, None)
    return calls.get(getattr(transform, "name", None)) if isinstance(calls, dict) else None


def held_transforms(call: Call) -> list[tuple[str | None, Any]]:
    """The transforms among `call`'s arguments, in their order, each with its key where an
    argument holds them by key (a `functrain.partition`'s labels), else None.

    Example:
        >>> import functrain as ft
        >>> tx = ft.partition(lambda name, p: "a", a=ft.sgd(0.1), b=ft.chain(ft.sgd(0.2)))
        >>> [key for key, _ in held_transforms(recorded_call(tx))]
        ['a', 'b']
    """
    held: list[tuple[str | None, Any]] = []
    for value in call.arguments.values():
        if isinstance(value, Transform):
            held.append((None, value))
        elif isinstance(value, dict):
            held += [(str(k), x) for k, x in value.items() if isinstance(x, Transform)]
        elif isinstance(value, (tuple, list)):
            held += [(None, x) for x in value if isinstance(x, Transform)]
    return held


def _record(update: Any, name: str, call: Call) -> None:
    """Keep `call` on the update function it built (not on one that takes no attributes).

    On the function rather than in a table: nothing outlives the transform. A function that several
    named transforms share (a factory returning its inner transform renamed) keeps each by its name.
    """
    calls = getattr(update, _CALLS, None)
    if not isinstance(calls, dict):
        calls = {}
        try:
            setattr(update, _CALLS, calls)
        except (AttributeError, TypeError):  # a bound method or a builtin
            return
    calls[name] = call


def named(
    factory: Callable[..., Transform] | None = None,
    *,
    added: tuple[str, ...] | dict[str, Any] = (),
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    resumed: tuple[str, ...] = (),
) -> Any:
    """Decorate a transform factory so its transforms carry their call.

    E.g. ``adamw(lr=0.001, ...)``.

    The name shows in a `TrainState`'s repr and in a checkpoint's fingerprint, where a different
    optimizer or hyperparameter is reported on load. Arguments listed in `added` (ones a later
    version introduced, as ``@named(added=("fused",))``) are left out of the name while at their
    default, so checkpoints written before they existed still load; a dict names the value to
    leave out instead (``added={"fused": False}``: what the name meant before the argument existed,
    whatever its default is now). `resolve` rewrites the bound arguments before they are named
    (`functrain.optim.choices.without_choices`: torch's implementation choices, which change no
    number, leave the name as the configuration they select). The transform keeps the call too
    (`recorded_call`). Arguments of the dict `added` listed in `resumed` are conventions whose
    default changed: a checkpoint whose name lacks one was trained with the value `added` gives,
    and resumes with it (`as_saved`).
    """
    if factory is None:
        return functools.partial(named, added=added, resolve=resolve, resumed=resumed)
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Transform:
        _refuse_graph_arguments(factory.__name__, signature, args, kwargs)
        transform = factory(*args, **kwargs)
        name = describe_call(factory, signature, args, kwargs, added, resolve)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        shown = arguments if resolve is None else resolve(dict(arguments))
        _record(transform.update, name, Call(wrapper, signature, arguments, shown))
        return transform._replace(name=name)

    if resumed:
        assert isinstance(added, dict), "resumed names arguments of an added dict"
        setattr(wrapper, _RESUMED, {key: added[key] for key in resumed})
    return wrapper


# the attribute of a named factory that keeps its `resumed` conventions' old values
_RESUMED = "_functrain_resumed"


def _refuse_graph_arguments(
    where: str, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> None:
    """Refuse a hyperparameter given as a tensor that requires grad (a learning rate, betas, a
    weight decay): a transform reads its value once, so no gradient would ever reach it.

    Raises:
        ConfigError: naming the arguments and the fix.
    """
    given = [*args, *kwargs.values()]
    if not any(_requires_grad(v) for v in given):
        return
    bound = signature.bind(*args, **kwargs)
    names = [name for name, value in bound.arguments.items() if _requires_grad(value)]
    config_check(
        [
            (
                f"{name} is a tensor that requires grad"
                if isinstance(bound.arguments[name], torch.Tensor)
                else f"{name} holds a tensor that requires grad"
            )
            + ": its value is read once, as a number, so no gradient would reach it; pass "
            + (
                f"its value, {name}.item()"
                if isinstance(bound.arguments[name], torch.Tensor)
                else "the values (t.item() of each tensor t in it)"
            )
            + " (for a hypergradient, create the state with differentiable=True and give the "
            "tensor to state.with_hyperparameters)"
            for name in names
        ],
        where,
    )


def _requires_grad(value: Any) -> bool:
    """Whether `value`, or a tensor in a tuple, list or dict it is, requires grad."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def describe_call(
    factory: Callable[..., Any],
    signature: inspect.Signature,
    args: tuple,
    kwargs: dict[str, Any],
    added: tuple[str, ...] | dict[str, Any] = (),
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str:
    """``factory(name=value, ...)`` with every argument, defaults included.

    For the names of transforms and schedules.

    Arguments in `added` are left out while they equal their default (or, `added` a dict, the value
    it gives); `resolve`, if given, rewrites the bound arguments first. A plain function as a
    learning rate (``lr=``, ``learning_rate=``) is named with its values (`function_name`).
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments) if resolve is None else resolve(dict(bound.arguments))
    silent = (
        added
        if isinstance(added, dict)
        else {key: signature.parameters[key].default for key in added}
    )
    parts: list[str] = []
    for key, value in arguments.items():
        if key in silent and value == silent[key]:
            continue
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            parts.extend(describe_value(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            parts.extend(f"{k}={describe_value(v)}" for k, v in value.items())
        elif key in RATE_ARGUMENTS and is_plain_function(value):
            # its values and the convention it is called with: another function is another rate
            parts.append(f"{key}={function_name(value)}")
        else:
            parts.append(f"{key}={describe_value(value)}")
    return f"{factory.__name__}({', '.join(parts)})"


def describe_value(value: Any) -> str:
    """A stable text for an argument.

    A transform's or schedule's name, a class name, else its repr.
    """
    if isinstance(value, Transform):
        return value.name
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        # a tensor lr: its exact value (a tensor's repr rounds to 4 digits) and dtype, which torch
        # computes in
        return f"tensor({value.item()!r}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and any(
        callable(v) or isinstance(v, (list, tuple)) for v in value
    ):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    if isinstance(
        value, functools.partial
    ):  # a config's `_partial_: true` callable: named by what it calls
        bound = [describe_value(v) for v in value.args] + [
            f"{k}={describe_value(v)}" for k, v in value.keywords.items()
        ]
        return describe_value(value.func) + (f"({', '.join(bound)})" if bound else "")
    if callable(value):
        name = getattr(value, "name", None)
        return name if name else getattr(value, "__name__", type(value).__name__)
    return repr(value)


# the convention of plain-function learning rates in `saved_conventions`: before functions were
# called with a Python int, they were called with the step tensor and named alone (``lr=<lambda>``)
FUNCTION_RATES = "function rates"


def saved_conventions(transform: Transform) -> tuple[str, ...]:
    """The conventions `transform` holds that a checkpoint may have been trained without.

    `FUNCTION_RATES` where a plain function is a learning rate; ``"factory.argument"`` (e.g.
    ``"lion.reference"``, ``"accumulate.reduce"``) for each `resumed` argument of a factory away
    from its old value. Each was recorded at its own time, so a checkpoint lacks any few of them.

    Example:
        >>> import functrain as ft
        >>> saved_conventions(ft.accumulate(ft.sgd(lambda s: 0.1), 2, reduce="sum"))
        ('accumulate.reduce', 'function rates')
    """
    found: set[str] = set()
    _walk(transform, found)
    return tuple(sorted(found))


def _walk(value: Any, found: set[str]) -> None:
    if isinstance(value, Transform):  # a NamedTuple: before tuples
        call = recorded_call(value)
        if call is None:
            return
        for key, old in getattr(call.factory, _RESUMED, {}).items():
            if call.arguments[key] != old:
                found.add(f"{call.factory.__name__}.{key}")
        for key, argument in call.arguments.items():
            if key in RATE_ARGUMENTS and is_plain_function(argument):
                found.add(FUNCTION_RATES)
            else:
                _walk(argument, found)
    elif isinstance(value, tuple | list):
        for item in value:
            _walk(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, found)


def function_rates(
    transform: Transform, arguments: tuple[str, ...] = RATE_ARGUMENTS
) -> tuple[Callable[[int], Any], ...]:
    """Each plain function given as a learning rate (or as one of `arguments`, such as
    ``("weight_decay",)``) in `transform`'s recorded calls, in order.

    In the order `_arguments` walks them: two transforms of the same name give their functions in
    the same order.

    Example:
        >>> import functrain as ft
        >>> warm = lambda step: min(1.0, (step + 1) / 100)
        >>> function_rates(ft.accumulate(ft.chain(ft.sgd(warm), ft.adam(0.1)), 2)) == (warm,)
        True
    """
    return tuple(
        value
        for _, value in _arguments(
            transform, lambda key, value: key in arguments and is_plain_function(value)
        )
    )


def _arguments(transform: Transform, wanted: Callable[[str, Any], bool]) -> list[tuple[str, Any]]:
    """The arguments of `transform`'s recorded calls that ``wanted(name, value)`` picks, as
    ``(name, value)``: the calls walked as they were made, depth first, each call's arguments in
    its signature's order (two transforms of the same name give them in the same order)."""
    found: list[tuple[str, Any]] = []

    def walk(value: Any, key: str) -> None:
        if wanted(key, value):
            found.append((key, value))
        elif isinstance(value, Transform):  # a NamedTuple: before tuples
            call = recorded_call(value)
            for name, argument in call.arguments.items() if call is not None else ():
                walk(argument, name)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item, "")
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, "")

    walk(transform, "")
    return found


def function_choices(transform: Transform, params: dict[str, torch.Tensor]) -> list[list[Any]]:
    """What each function given as a mask or a partition's labels in `transform` decides for each
    of `params`, in the order of its recorded calls, depth first.

    A checkpoint records them (its fingerprint's ``"choices"``): two masks are named alike
    (``mask=<lambda>``) whatever they decide. Each decision is a bool or a str as the function
    gave it (a mask's coerced to bool), or None where the function raises for that parameter or
    a mask's answer has no truth value there (a tensor of a meta-device parameter's).

    Example:
        >>> import functrain as ft
        >>> tx = ft.adamw(1e-3, mask=lambda name, p: p.ndim == 2)
        >>> function_choices(tx, {"w": torch.zeros(2, 2), "b": torch.zeros(2)})
        [[True, False]]
    """

    def decide(fn: Callable[..., Any], key: str, name: str, p: torch.Tensor) -> Any:
        try:  # (a mask's tensor of the meta device's stand-in has no value to coerce)
            decision = fn(name, p)
            if key == "mask":
                return bool(decision)
        except Exception:  # noqa: BLE001 - recorded as such: one that raises decides nothing
            return None
        return decision if isinstance(decision, str) else repr(decision)

    def chosen(key: str, value: Any) -> bool:
        return key in _CHOICE_ARGUMENTS and callable(value) and not isinstance(value, Transform)

    return [
        [decide(fn, key, name, p) for name, p in params.items()]
        for key, fn in _arguments(transform, chosen)
    ]


def chosen_conventions(transform: Transform) -> tuple[str, ...]:
    """The value of each `resumed` argument `transform` holds, as ``"factory.argument=value"``.

    What a checkpoint records (its fingerprint's ``"conventions"``), so that a load tells a run
    that chose a convention's old value (``lion(reference="lerp")``, named as before the argument
    existed) from one written before the argument did.

    Example:
        >>> import functrain as ft
        >>> chosen_conventions(ft.chain(ft.lion(1e-3, reference="lerp"), ft.lion(1e-3)))
        ("lion.reference='authors'", "lion.reference='lerp'")
    """
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, Transform):
            call = recorded_call(value)
            if call is None:
                return
            for key in getattr(call.factory, _RESUMED, {}):
                found.add(f"{call.factory.__name__}.{key}={call.arguments[key]!r}")
            for argument in call.arguments.values():
                walk(argument)
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(transform)
    return tuple(sorted(found))


def as_saved(transform: Transform, rewound: Collection[str] | None = None) -> Transform | None:
    """`transform` with the conventions of a checkpoint written before they were recorded.

    The transform rebuilt from its recorded calls (`recorded_call`) with the conventions in
    `rewound` (labels of `saved_conventions`; all of them when None) at their old values: each
    plain function in a learning-rate argument wrapped as `as_tensor_steps` under its old name
    (called with the step tensor, as before plain functions got ints), and each `resumed`
    argument of a factory at its old value. None when nothing changes, or when a call cannot be
    rebuilt.

    Example:
        >>> import functrain as ft
        >>> tx = ft.accumulate(ft.lion(1e-3), 2, reduce="sum")
        >>> as_saved(tx, ["accumulate.reduce"]).name[-30:]
        "reference='authors'), every=2)"
    """
    wanted = frozenset(saved_conventions(transform) if rewound is None else rewound)
    rebuilt = _rebuilt(transform, wanted)
    return None if rebuilt is _CANNOT or rebuilt is transform else rebuilt


_CANNOT: Any = object()  # an argument that cannot be rebuilt


def _rebuilt(transform: Transform, rewound: frozenset[str]) -> Any:
    call = recorded_call(transform)
    if call is None:
        return transform
    changes: dict[str, Any] = {}
    for key, old in getattr(call.factory, _RESUMED, {}).items():
        if f"{call.factory.__name__}.{key}" in rewound and call.arguments[key] != old:
            changes[key] = old
    for key, value in call.arguments.items():
        if key in changes:
            continue
        new = _argument(key, value, rewound)
        if new is _CANNOT:
            return _CANNOT
        if new is not value:
            changes[key] = new
    return call.again(**changes) if changes else transform


def _argument(key: str, value: Any, rewound: frozenset[str]) -> Any:
    if isinstance(value, Transform):
        return _rebuilt(value, rewound)
    if key in RATE_ARGUMENTS and is_plain_function(value):
        return as_tensor_steps(value, as_saved=True) if FUNCTION_RATES in rewound else value
    if isinstance(value, tuple | list):
        items = [_argument("", v, rewound) for v in value]
        if any(v is _CANNOT for v in items):
            return _CANNOT
        same = all(a is b for a, b in zip(items, value, strict=True))
        return value if same else type(value)(items)
    if isinstance(value, dict):
        entries = {k: _argument("", v, rewound) for k, v in value.items()}
        if any(v is _CANNOT for v in entries.values()):
            return _CANNOT
        return value if all(entries[k] is v for k, v in value.items()) else entries
    return value
