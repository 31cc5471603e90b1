"""The one error hierarchy: every error functrain raises on purpose is a `FunctrainError`.

Messages follow one shape: what was expected, what was got, and how to fix it.
"""

from __future__ import annotations

from attrs.exceptions import FrozenInstanceError

__all__ = [
    "FunctrainError",
    "ConfigError",
    "StateMismatchError",
    "BatchError",
    "LossError",
    "NonFiniteError",
    "ConvergenceError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMemoryError",
    "CheckpointPermissionError",
    "CheckpointVanishedError",
    "DonatedStateError",
    "ImmutableStateError",
    "WeightlessModuleError",
    "PeerFailedError",
]


class FunctrainError(Exception):
    """Base class of every error functrain raises on purpose.

    Example:
        >>> import functrain as ft
        >>> try:
        ...     ft.adamw(lr=-1.0)
        ... except ft.FunctrainError as e:
        ...     print(type(e).__name__, "-", str(e).splitlines()[1].strip())
        ConfigError - - lr must be >= 0, got lr=-1.0
    """


class ConfigError(FunctrainError, ValueError):
    """A hyperparameter or option is invalid; raised at construction, naming the argument."""


class StateMismatchError(FunctrainError):
    """Two trees (a state and a template, grads and params) do not have the same structure."""


class BatchError(FunctrainError, TypeError):
    """The loss function could not use the batch it was given."""


class LossError(FunctrainError, TypeError):
    """The loss function returned something other than a scalar loss and tensor metrics."""


class NonFiniteError(FunctrainError, FloatingPointError):
    """Non-finite gradients were seen more often than the configured cap allows."""


class ConvergenceError(FunctrainError, ArithmeticError):
    """An iterative solve did not converge: its residual grew, became non-finite, or stayed above
    the tolerance when the iterations ran out.

    Raised by `functrain.implicit_gradient` rather than returning a hypergradient that is not
    one. The message names the solver, the residual and the iterations it took, and the fix.
    """


class CheckpointError(FunctrainError):
    """A checkpoint could not be written or read.

    Also what `functrain.save` raises, writing nothing, where something functrain did not write
    is at the path (a file, a directory of other files, a symbolic link, a checkpoint whose
    manifest does not verify) or a running `CheckpointManager` holds the directory.
    """


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's files do not match their recorded digests or are malformed."""


class CheckpointMemoryError(CheckpointError, MemoryError):
    """A checkpoint's tensors do not fit in the memory available now; nothing says it is broken.

    Raised before the load allocates where the memory available now (free memory, the cgroup's
    limit, the address-space limit) cannot hold them; and where the load ran short while it read
    (memory, the threads that hash it, file descriptors). `CheckpointManager.restore_latest` (and
    `fit(resume=True)`) raises it rather than passing over the checkpoint for an older one, as it
    does with a broken checkpoint.
    """


class CheckpointPermissionError(CheckpointError):
    """This process may not read (or write) a checkpoint: its message names the path and mode.

    Not damage and not "no checkpoint": another user's run, or files written under a restrictive
    umask. `CheckpointManager.restore_latest` (and `fit(resume=True)`) raises it rather than
    passing over the checkpoint for an older one or starting afresh, and a writer refuses to save
    into a directory where it cannot see what is there; nothing is moved or removed.
    """


class CheckpointVanishedError(CheckpointError):
    """A checkpoint was removed or replaced while it was read: a writer rotated it away.

    Not damage: read the newest checkpoint again (`CheckpointManager.latest`, or
    `CheckpointManager.restore_latest`, which does so itself).
    """


class DonatedStateError(FunctrainError):
    """A state was used after a ``donate=True`` step took it: its storage holds the next state.

    The message names the call that donated it and how to keep a copy (``state.clone()`` before
    the call, or the call without ``donate=True``).
    """


class ImmutableStateError(FunctrainError, TypeError, FrozenInstanceError):
    """A `TrainState`, or a mapping it holds, was assigned to in place.

    A `TypeError`, as Python's read-only mappings raise, and attrs' `FrozenInstanceError` (an
    `AttributeError`), as a frozen class's fields raise.

    A state is a value: its fields, and its mappings (``params``, ``frozen``, ``buffers``,
    ``driver``, ``user``), are shared by every state made from it and refuse changes. The
    message names the change and the ``state.replace(...)`` that makes it.
    """


class PeerFailedError(FunctrainError, RuntimeError):
    """A collective of `fit` under torch.distributed failed because another rank left it.

    Another rank raised, was stopped or ran out of data while this one waited for it, or did not
    reach the collective within the process group's timeout; the message says which, and points at
    that rank's log or at the timeout. The collective's own error is the ``__cause__``.
    """


class WeightlessModuleError(FunctrainError, RuntimeError):
    """A state's module (its structure, without weights) was called outside a step.

    The message names what runs the model on the state's weights: ``functrain.predict(state, x)``
    or ``state.export_module()``.
    """


def config_check(problems: list[str], where: str) -> None:
    """Raise one `ConfigError` listing every problem found while validating `where`."""
    if problems:
        lines = "\n  - ".join(problems)
        raise ConfigError(f"invalid arguments to {where}:\n  - {lines}")


def listed(names: list[str], most: int = 5) -> str:
    """The first `most` of `names` for a message, and how many more there are.

    Example:
        >>> listed(["a", "b", "c"], most=2)
        'a, b and 1 more'
    """
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
