"""The signals that stop a run of `fit` at the end of an update, with a checkpoint of its state.

Three signals ask a run to stop: SIGINT (Ctrl-C), SIGTERM (what a scheduler, Kubernetes or
``kill`` sends before SIGKILL) and SIGUSR1 (what SLURM sends ahead of a job's time limit with
``--signal=USR1@<seconds>``, for the job to save and be requeued). While `fit` trains, each one
is taken between updates: the update under way ends, the state in hand is saved (with a
``checkpoint_dir``), and the run stops. After SIGINT `fit` hands the state back, as after any
`KeyboardInterrupt`; after SIGTERM or SIGUSR1 it raises `Preempted`, which, uncaught, ends the
process with exit status ``128 + the signal's number`` (143 for SIGTERM and 138 for SIGUSR1 on
Linux) and no traceback, the status a shell gives a process the signal killed.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["STOP_REASONS", "Preempted", "StopSignals", "exit_status", "stopped_how"]

STOP_REASONS: dict[int, str] = {
    signal.SIGINT: "interrupted",
    signal.SIGTERM: "terminated",
    signal.SIGUSR1: "requeue",
}
"""Each signal `StopSignals` takes, and the stop reason of a run it stopped."""


def exit_status(signum: int) -> int:
    """The exit status of a process that stopped for signal `signum`: 128 plus its number.

    Example:
        >>> exit_status(signal.SIGINT), exit_status(signal.SIGTERM)
        (130, 143)
    """
    return 128 + signum


def stopped_how(signum: int) -> str:
    """How a line says that `signum` stopped a run: its stop reason, with the signal's name where
    it was no Ctrl-C.

    Example:
        >>> stopped_how(signal.SIGINT), stopped_how(signal.SIGUSR1)
        ('interrupted', 'requeue (SIGUSR1)')
    """
    reason = STOP_REASONS[signum]
    return reason if signum == signal.SIGINT else f"{reason} ({signal.Signals(signum).name})"


class Preempted(SystemExit):
    """`fit` stopped by SIGTERM or SIGUSR1, after it saved the state in hand.

    A `SystemExit`, as Python's own exit is: uncaught it ends the program with exit status
    `code` (``128 + signum``) and prints nothing, so a scheduler sees a run that was stopped,
    not one that finished; ``except Exception`` does not catch it. Caught, it holds what `fit`
    would have returned.

    Attributes:
        signum: the signal (``signal.SIGTERM`` or ``signal.SIGUSR1``).
        result: the `FitResult` of the run (its state the one after the last completed update,
            its ``stop_reason`` ``"terminated"`` or ``"requeue"``, or the reason the run ended
            for when the signal came after its last update).
        checkpoint: the checkpoint the run goes on from with ``resume=True`` (None without a
            ``checkpoint_dir``).
    """

    def __init__(self, signum: int, result: Any = None, checkpoint: Path | None = None) -> None:
        super().__init__(exit_status(signum))
        self.signum, self.result, self.checkpoint = signum, result, checkpoint

    def __str__(self) -> str:
        where = (
            f"saved {self.checkpoint}; fit(..., resume=True) goes on from it"
            if self.checkpoint is not None
            else "nothing was saved (no checkpoint_dir)"
        )
        return f"fit stopped by {signal.Signals(self.signum).name}: {where}"


class StopSignals:
    """Within: SIGINT, SIGTERM and SIGUSR1 are recorded, for the loop to stop at an update's end.

    Installed only in the main thread (the only one Python runs handlers in), only when
    `enabled`, and for each signal only where its handler is Python's own (SIGINT's
    `signal.default_int_handler`, the default action for the others): a handler of the user's, or
    an ignored signal, is left alone. The first of each signal puts its previous handler back, so
    a second one acts at once (a second Ctrl-C interrupts, a second SIGTERM ends the process).
    Every handler is put back on exit.

    Attributes:
        received: the first signal that came, or None.
        preempted_by: the first SIGTERM or SIGUSR1 that came, or None.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.received: int | None = None
        self.preempted_by: int | None = None
        self.signalled = False  # a real signal came (a second then acts at once)
        self.handling: set[int] = set()  # the signals whose handler is this one
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_REASONS:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            previous = signal.getsignal(signum)
            if previous == default:
                self._previous[signum] = signal.signal(signum, self._asked)
                self.handling.add(signum)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        while self._previous:
            signum, previous = self._previous.popitem()
            signal.signal(signum, previous)

    def ask(self, signum: int) -> None:
        """Record a stop asked in code (a callback's `KeyboardInterrupt`) as if `signum` came.

        A second stop asked so does not act at once: a callback may stop the run at several
        hooks. After a real signal (`signalled`), `Loop.fire` lets a `KeyboardInterrupt`
        propagate: the second Ctrl-C, which acts at once.
        """
        if self.received is None:
            self.received = signum
        if signum != signal.SIGINT and self.preempted_by is None:
            self.preempted_by = signum

    def _asked(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True
        self.ask(signum)
        previous = self._previous.pop(signum, None)
        if previous is not None:
            signal.signal(signum, previous)
