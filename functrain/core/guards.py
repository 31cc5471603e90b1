"""Which of dynamo's guards a compiled step keeps, and what it says when one fails.

dynamo guards a compiled frame on everything its code read: the tensors' metadata, the batch,
torch's global state, and every Python object on the way (the module's attributes, the loss
function's closure cells, the globals of every module whose code ran, functrain's transforms and
their closures). A compiled step (`functrain.core.compiled`) keeps the guards that can change
between two calls of one configuration: the tensors, the batch, torch's global state, and what
is reached through the user's own objects (`guard_filter`), so that a changed value compiles the
step again instead of training on the old one. It leaves out the guards on functrain's and
torch's own objects and modules, which the configuration's key fixes: on a small model they are
most of the guards (dynamo's check on the MLP 20-48-5 with EMA and clipping: 21 us a call
with every guard, 8 us with these).

A compilation for a changed value is reported (`Watched`: `RecompileWarning`, naming it from
dynamo's reason, `described`), and past ``torch._dynamo.config.recompile_limit`` compilations,
where dynamo runs the body as Python, the body refuses before it runs (`refuse_if_spent`). A
graph that replays a call without dynamo (`functrain.core.capture`) checks the same guards before
each replay (`Watched.check_for`).
"""

from __future__ import annotations

import os
import re
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from functrain.core.loss import user_level
from functrain.errors import ConfigError

__all__ = ["RecompileWarning", "Spent", "Watched", "described", "guard_filter", "refuse_if_spent"]


class RecompileWarning(UserWarning):
    """`compile_step` compiled a step again because a value the loss function or module reads
    in Python changed (a global, a closure cell, a module attribute, a ``training`` flag).

    The compiled step then trains on the new value, as `train_step` would; each new value costs
    one more compilation, up to ``torch._dynamo.config.recompile_limit`` per configuration, past
    which the step refuses (`ConfigError`). A value that changes at every step belongs in a
    tensor: in the batch, or computed from the step count by a schedule.
    """


# the top-level packages whose objects are not the user's: what they hold fixes the configuration
_LIBRARIES = frozenset({"torch", "functrain", "builtins", *sys.stdlib_module_names})


def _library(module_name: str | None) -> bool:
    return (module_name or "builtins").partition(".")[0] in _LIBRARIES


def _users(value: Any, given: tuple) -> bool:
    """Whether a guarded `value` is the user's: one of `given` (the state's module and loss
    function), a module, or a module, function, class or object of code outside torch,
    functrain and the standard library (a user's schedule or transform inside functrain's)."""
    if any(value is g for g in given) or isinstance(value, nn.Module):
        return True
    if isinstance(value, types.ModuleType):
        return not _library(value.__name__)
    if isinstance(value, (types.FunctionType, type)):
        return not _library(value.__module__)
    if isinstance(value, types.MethodType):
        return _users(value.__func__, given) or _users(value.__self__, given)
    return not _library(type(value).__module__)


def _keep_guard(entry: Any) -> bool:
    # torch's global state (empty name), anything about the batch, and the tensors' metadata
    return not entry.name or entry.name.startswith("batch") or entry.guard_type == "TENSOR_MATCH"


# the arguments and closure variables of the bodies compile_step compiles: no code they call
# names a variable so
_OWN_FRAME = re.compile(r"(L\[')?compiled_")


def guard_filter(given: tuple, entries: list[Any]) -> list[bool]:
    """The guards dynamo keeps of a frame it compiled (`given`: the state's module and loss).

    Of a body's own frame: torch's global state, the batch, the tensors' metadata, and every
    guard on what is reached through the user's objects (`_users`: the module's attributes and
    ``training`` flags, the loss function's closure cells, the globals of the user's modules, a
    user's schedule inside the transform), so that a change of any of them compiles the body
    again. Left out: the guards on functrain's and torch's own objects and modules, which the
    configuration's key fixes (`CompiledStep._cached`). A frame of code the body calls, compiled
    apart where the body's graph breaks, keeps every guard.
    """
    if not any(_OWN_FRAME.match(e.name) for e in entries):
        return [True] * len(entries)
    roots = {e.name for e in entries if e.name and e.has_value and _users(e.value, given)}
    if not roots:
        return [_keep_guard(e) for e in entries]
    # a root's name inside an entry's (``x.attr``, ``x[0]``, ``type(x).__dict__``), whole
    rooted = re.compile(
        "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True)) + r"(?![\w'])"
    )
    return [_keep_guard(e) or rooted.search(e.name) is not None for e in entries]


def _cache_entries(code: types.CodeType) -> list[Any]:
    """What dynamo has compiled of `code`, one entry per set of guards."""
    return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)


def _guard_failures(code: types.CodeType) -> list[str]:
    """dynamo's reasons for compiling `code` again, oldest first (one per entry it then held)."""
    import torch._dynamo.utils  # imported by now: torch.compile imported it

    return torch._dynamo.utils.guard_failures.get(code, [])


# a reason of dynamo's: "<compile id>: <guard that failed>  # <source line>  # <file:line in fn>"
_REASON = re.compile(r"^(\d+/\d+: )?(?P<guard>[^#]*)(#(?P<source>.*)#(?P<where>[^#]*))?")
# a guard that failed on the batch, a tensor's metadata or torch's global state: no Python value
_NO_VALUE = re.compile(r"^(tensor '|GLOBAL_STATE)|(?<![\w'.])batch\b")
_IMPORTED = re.compile(r"G\['__import_(\w+?)'\]")
# a path to a state's static part (the compiled body's `statics_of` dict, however it is reached)
_STATIC = re.compile(r"(?<![\w.\]'])[\w.\[\]']*?\['(?P<field>module|loss_fn|tx|averager)'\]")


def described(reason: str) -> tuple[str, bool]:
    """A reason of dynamo's in the user's words, and whether it names a value the user changed.

    Example:
        >>> described("0/1: G['__import_my_dot_loss'].SCALE == 1.0  # x * SCALE  # loss.py:9 in f")
        ('`my.loss.SCALE == 1.0` no longer holds (loss.py:9 in f: x * SCALE)', True)
        >>> described("0/1: tensor 'batch[0]' size mismatch at index 0. expected 8, actual 5")[1]
        False
    """
    found = _REASON.match(reason.strip())
    if found is None:  # never: the pattern matches any text
        return reason, True
    guard = found.group("guard").strip()
    named = _IMPORTED.sub(lambda m: m.group(1).replace("_dot_", "."), guard)
    named = _STATIC.sub(r"state.\g<field>", named)
    source, where = (found.group(k) or "" for k in ("source", "where"))
    if not (source.strip() or where.strip()):
        return f"`{named}` no longer holds", _NO_VALUE.search(guard) is None
    read = f"{where.strip().splitlines()[0]}: {source.strip()}" if source.strip() else where.strip()
    return f"`{named}` no longer holds ({read})", _NO_VALUE.search(guard) is None


def refuse_if_spent(code: types.CodeType) -> None:
    """Refuse a body that dynamo runs as Python because it compiled it as often as it may.

    Raises:
        ConfigError: ``torch._dynamo.config.recompile_limit`` compilations of the body, naming
            the last reason.
    """
    import torch._dynamo  # imported by now: torch.compile imported it

    limit = torch._dynamo.config.recompile_limit
    held = len(_cache_entries(code))
    if not held or held < limit:
        return  # dynamo runs it as Python for another reason (disabled, a compile that failed)
    # the reasons of the last attempt, one per entry held, the last one used first
    failures = _guard_failures(code)
    why = described(failures[-held])[0] if len(failures) >= held else "a guard failed"
    raise Spent(
        f"compile_step has compiled this step {held} times, torch._dynamo.config."
        f"recompile_limit, and would compile it again because {why}; it compiles it no more, "
        "and running it uncompiled is not what was asked. A value the loss function or module "
        "reads in Python that changes between steps (a counter, an annealed weight, a module "
        "attribute) compiles the step again for each new value: pass it as a tensor (in the "
        "batch, or a schedule of the step count); so does each new batch shape: pad or bucket "
        "the batches to a few shapes (drop_last=True for the last partial one); or raise "
        "torch._dynamo.config.recompile_limit"
    )


class Spent(ConfigError):
    """`refuse_if_spent`'s error: raised before the body ran, so a donated state stays usable."""


class Watched:
    """A configuration's compiled body, called: after each call, the compilations it caused.

    dynamo compiles a body again when one of its guards fails: a new batch shape, torch's global
    state (autocast), or a value the user's code reads in Python (`guard_filter` keeps those).
    Each of the last kind is reported (`RecompileWarning`), naming the value; the limit on them
    is dynamo's (`refuse_if_spent`). The check is one dictionary look-up per call.
    """

    __slots__ = ("fn", "body", "code", "seen")

    def __init__(self, fn: Callable[..., Any], body: types.FunctionType) -> None:
        self.fn = fn
        self.body = body  # what `fn` compiles
        self.code = body.__code__
        self.seen = 0

    def check_for(self, *args: Any) -> Callable[[], str | None]:
        """A check of the guards of the code that ran on `args` (a call just made), on them again.

        For a graph that replays that call without dynamo (`functrain.core.capture`): the check
        returns None while every guard holds, else the first that failed, in the user's words.
        The arguments must be the very objects the replay runs on. One guard evaluation a call,
        as a compiled call's.
        """
        scope = dict(zip(self.code.co_varnames, args, strict=False))
        cells = zip(self.code.co_freevars, self.body.__closure__ or (), strict=True)
        scope.update((name, cell.cell_contents) for name, cell in cells)
        held = [e.guard_manager for e in _cache_entries(self.code)]
        guards = next((g for g in held if g.check(scope)), None)
        if guards is None:  # the call ran as Python (dynamo disabled): nothing to check
            return lambda: None

        def check() -> str | None:
            if guards.check(scope):
                return None
            failed = guards.check_verbose(scope).verbose_code_parts
            return described(failed[0] if failed else "a guard failed")[0]

        return check

    def __call__(self, *args: Any) -> Any:
        try:
            out = self.fn(*args)
        except BaseException as e:
            self.seen = len(_guard_failures(self.code))  # nothing was compiled to report
            raised = _raised_by_graph(e)
            if raised is not e:
                raise raised from None
            raise
        failures = _guard_failures(self.code)
        if len(failures) != self.seen:
            self._report(failures)
        return out

    def _report(self, failures: list[str]) -> None:
        # a compilation adds a reason per entry dynamo held, the last one used first: what
        # changed since the previous call (torch._dynamo.reset() empties the list)
        first = failures[self.seen] if len(failures) > self.seen else failures[0]
        self.seen = len(failures)
        changed, value = described(first)
        if not value:
            return  # a batch shape or torch's global state: compiled once each, as documented
        import torch._dynamo  # imported by now: torch.compile imported it

        warnings.warn(
            f"compile_step compiled the step again because a value it reads in Python changed: "
            f"{changed}. It trains on the new value, as train_step does; this configuration "
            f"has been compiled {len(_cache_entries(self.code))} times, and past "
            f"torch._dynamo.config.recompile_limit ({torch._dynamo.config.recompile_limit}) "
            "the step refuses. A value that changes at every step belongs in a tensor (in the "
            "batch, or a schedule of the step count)",
            RecompileWarning,
            stacklevel=user_level(),
        )


def _raised_by_graph(error: BaseException) -> BaseException:
    """What the compiled call raised: the graph's exception where torch 2.11 put its own over it.

    After a graph run as Python (``backend="eager"``) raised inside ``torch.func.grad`` or
    ``torch.vmap``, torch 2.11's dynamo undoes functorch's transform stack, which the graph's own
    exit already undid, and fails an internal assert in place of the graph's exception (then the
    assert's context).
    """
    context = error.__context__
    if not (isinstance(error, RuntimeError) and context is not None):
        return error
    text = str(error)
    if "INTERNAL ASSERT FAILED" not in text or "functorch" not in text:
        return error
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = "" if tb is None else tb.tb_frame.f_code.co_filename
    return context if where.endswith(os.path.join("_dynamo", "eval_frame.py")) else error
