"""Events and callbacks of `fit`, and the built-in ones (progress bar, logs, profiler, ...).

A callback is an object with any of the hook methods below, each taking the `Run` (what the
driver knows at that moment). Hooks are checked when the callback is given to `fit`, not when they
first fire. A plain function becomes a callback with `on`::

    @functrain.on("batch_end", every=100)
    def report(run):
        print(run.step, run.logs)

Callbacks see metrics as host numbers (`Run.logs`) only at log intervals; in between, `Run.logs`
is None and nothing is read back from the device.

A run ends with ``on_train_end``, or, when an exception ends it (a `KeyboardInterrupt` included),
with ``on_exception`` (the exception is `Run.exception`). Either is the place to close what
``on_train_begin`` opened; the built-in callbacks close their files, bars and profilers in both.
The exception propagates from `fit` unchanged after the hooks ran (one a hook raises is added to
it as a note), but for an interrupt: `fit` then returns the state after the last completed update,
with stop reason ``"interrupted"``. A `KeyboardInterrupt` a hook raises is taken as Ctrl-C is: the
other callbacks get the hook, the update under way ends with its evaluation and saves (an epoch's
last update leaves the epoch's end to the resumed run), and the run stops there; raised after the
last update (in the final save's ``on_save``, or ``on_train_end``) it has nothing left to stop.
Under torch.distributed it propagates at once.

What hooks write into ``run.user`` is in the checkpoint a resumed run starts from: ``on_save``,
``on_eval_end`` and ``on_epoch_end`` fire after the save of their update or epoch, so where they
wrote it that checkpoint is written again (``on_save`` not fired again). A resumed run fires
``on_train_begin``, ``on_epoch_begin`` of the epoch it goes on in and ``on_train_end`` again (so
does a resumed run that had finished): what those write is not replayed from the checkpoint.
"""

from __future__ import annotations

import inspect
import math
import os
import stat
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from functrain.driver.options import FitOptions, regular_file_problem
from functrain.errors import ConfigError

__all__ = [
    "HOOKS",
    "Callback",
    "Run",
    "on",
    "check_callback",
    "runs_users_code",
    "ProgressBar",
    "JsonlLogger",
    "ConsoleLogger",
    "TensorBoardLogger",
    "Profiler",
    "LRMonitor",
]

HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_batch_begin",
    "on_batch_end",
    "on_eval_end",
    "on_save",
    "on_epoch_end",
    "on_train_end",
    "on_exception",
)


class Run:
    """What the driver knows, as hooks see it.

    Attributes:
        state: the current `TrainState`, read-only: `fit` steps it (run `fit` per phase to
            change it between phases, e.g. to unfreeze a layer; your own values go in `user`).
        epoch: the current epoch (0-based).
        step: optimizer updates taken.
        batch: batches consumed in this epoch.
        batches: batches consumed in the run (this process and before a resume).
        micro: the place in the accumulation window (``accumulate_steps``): 0 at an update's
            bounds, that is in ``on_batch_begin`` of the batch that begins an update and in
            ``on_batch_end`` of the batch that completes one (always 0 without accumulation).
        total_steps: the run's planned number of updates, if known.
        batches_per_epoch: if known.
        logs: host metrics of the log interval that just ended, else None.
        eval_metrics: the latest evaluation's metrics, else None: ``val_loss``, the metrics
            `eval_fn` (or `loss_fn`) returns and the values of `fit`'s `eval_metrics` objects
            (``val_f1``), all there before any hook runs. To add a metric, give it to `fit` as
            one of those: a value a hook writes here reaches only the hooks after it, never the
            history, the best checkpoint or early stopping.
        saved: the path of the checkpoint just written (in ``on_save``).
        exception: the exception ending the run (in ``on_exception``), else None.
        history: the run's `History`.
        options: `fit`'s options (`FitOptions`: ``run.options.stopping.max_steps``), typed.
        config: the options with plain values by name (`FitOptions.run_config`: limits,
            intervals, batching, checkpoint and logging settings; not the objects, as `eval_fn`),
            the state's ``accumulate_steps`` and ``accumulate_convention``, and ``resumed_from``:
            the checkpoint a resumed run goes on from (a str), else None. A tracker logs it as the
            run's settings.
        user: your own state (`TrainState.user`): assign a new dict to change it; it is saved in
            the checkpoints with the rest of the state and restored on resume (what the hooks
            after a save write included: see the module's docstring).
    """

    def __init__(
        self,
        state: Any,
        history: Any,
        config: dict[str, Any],
        options: FitOptions | None = None,
    ) -> None:
        self.held = state  # (the driver's: `state`)
        self.history = history
        self.config = config
        self.options = options if options is not None else FitOptions()
        self.epoch = 0
        self.step = 0
        self.batch = 0
        self.batches = 0
        self.micro = 0
        self.total_steps: int | None = None
        self.batches_per_epoch: int | None = None
        self.logs: dict[str, float] | None = None
        self.eval_metrics: dict[str, float] | None = None
        self.saved: Path | None = None
        self.stop_reason: str | None = None
        self.exception: BaseException | None = None

    @property
    def state(self) -> Any:
        return self.held

    @state.setter
    def state(self, value: Any) -> None:
        raise ConfigError(
            "run.state is the state fit steps, which a hook reads and does not replace (fit would "
            "go on stepping its own). To change it between phases (a layer unfrozen, another "
            "optimizer), run fit per phase: result = ft.fit(state, ..., max_epochs=k), then "
            "ft.fit(result.state.replace(...), ..., max_epochs=n), whose epochs and updates go "
            "on from the first's; values of your own go in run.user"
        )

    @property
    def user(self) -> dict[str, Any]:
        return self.state.user

    @user.setter
    def user(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(
                "run.user must be a dict (a tree of tensors and JSON values), got "
                f"{type(value).__name__}: assign run.user = {{...}}"
            )
        self.held = self.held.replace(user=value)

    def request_stop(self, reason: str = "stopped by a callback") -> None:
        """Ask the driver to stop after the current batch (the state so far is kept and saved)."""
        self.stop_reason = reason

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None


class Callback:
    """Base class for callbacks: override any of the hooks; each receives the `Run`.

    Example:
        >>> class EpochPrinter(Callback):
        ...     def on_epoch_end(self, run):
        ...         print("epoch", run.epoch, "step", run.step)
        >>> check_callback(EpochPrinter())
        ['on_epoch_end']
    """

    def on_train_begin(self, run: Run) -> None: ...
    def on_epoch_begin(self, run: Run) -> None: ...
    def on_batch_begin(self, run: Run) -> None: ...
    def on_batch_end(self, run: Run) -> None: ...
    def on_eval_end(self, run: Run) -> None: ...
    def on_save(self, run: Run) -> None: ...
    def on_epoch_end(self, run: Run) -> None: ...
    def on_train_end(self, run: Run) -> None: ...
    def on_exception(self, run: Run) -> None: ...


def check_callback(callback: Any) -> list[str]:
    """The hooks `callback` implements, after checking each accepts exactly one argument (the run).

    Raises:
        ConfigError: a hook has the wrong signature, or the object implements no hook.
    """
    # a hook counts unless it is `Callback`'s no-op; `on()` sets its hook on the instance, not the
    # class
    hooks = [
        h
        for h in HOOKS
        if callable(getattr(callback, h, None))
        and getattr(getattr(callback, h), "__func__", None) is not getattr(Callback, h)
    ]
    if not hooks:
        raise ConfigError(
            f"{type(callback).__name__} is not a callback: expected one of the methods "
            f"{', '.join(HOOKS)}"
        )
    for hook in hooks:
        try:
            inspect.signature(getattr(callback, hook)).bind(object())
        except TypeError:
            if isinstance(callback, type):  # its hooks are methods of its objects
                raise ConfigError(
                    f"callbacks takes callback objects, got the class {callback.__name__}: pass "
                    f"{callback.__name__}(...)"
                ) from None
            sig = inspect.signature(getattr(callback, hook))
            raise ConfigError(
                f"{type(callback).__name__}.{hook}{sig} must accept one argument, the run: def "
                f"{hook}(self, run)"
            ) from None
    return hooks


def runs_users_code(callback: Any) -> bool:
    """Whether `callback` runs code of the user's (a class of theirs, or a function given to
    `on`): code that may keep what a hook reads, where functrain's own callbacks keep nothing of
    the state's (`fit` then watches the weights before it donates a state, `Loop._owns_state`),
    unless one says it calls a function of the user's on the model (``users_code``: `SampleText`
    given a `forward`)."""
    return (
        isinstance(callback, _FunctionCallback)
        or getattr(callback, "users_code", False) is True
        or not type(callback).__module__.startswith("functrain.")
    )


class _FunctionCallback(Callback):
    def __init__(self, event: str, fn: Callable[[Run], Any], every: int) -> None:
        self.event, self.fn, self.every = event, fn, every
        setattr(self, f"on_{event}", self._fire)

    def _count(self, run: Run) -> int:
        """The 1-based number of the update, evaluation or epoch this firing belongs to."""
        if self.event == "batch_end":
            return run.step  # the driver has already counted the update this batch completed
        if self.event == "batch_begin":
            return run.step + 1
        if self.event == "eval_end":
            return len(run.history.rows["eval"])
        if self.event == "epoch_end":
            return run.epoch  # the driver has already advanced to the next epoch
        return run.epoch + 1

    def _fire(self, run: Run) -> None:
        # under gradient accumulation several batches share an update: fire once for it, at the
        # batch that begins it (batch_begin) or completes it (batch_end)
        if self.event.startswith("batch") and run.micro != 0:
            return
        if self.every > 1:
            count = self._count(run)
            if count < 1 or count % self.every:
                return
        self.fn(run)

    def __repr__(self) -> str:
        return f"on({self.event!r}, every={self.every})({getattr(self.fn, '__name__', self.fn)})"


def on(event: str, *, every: int = 1) -> Callable[[Callable[[Run], Any]], Callback]:
    """Turn a function ``fn(run)`` into a callback for one event, optionally every N-th time.

    Args:
        event: a hook name without ``on_``: ``"batch_end"``, ``"epoch_end"``, ``"eval_end"``, ...
        every: fire on every N-th update (batch events: once per update under accumulation, at
            the batch that begins it or completes it, `every=1` included), evaluation
            (``"eval_end"``) or epoch (the others).

    Raises:
        ConfigError: unknown event, `every` < 1, or a function that does not take one argument.

    Example:
        >>> @on("epoch_end")
        ... def announce(run):
        ...     print("epoch", run.epoch)
        >>> announce
        on('epoch_end', every=1)(announce)
    """
    if f"on_{event}" not in HOOKS:
        raise ConfigError(f"unknown event {event!r}: expected one of {[h[3:] for h in HOOKS]}")
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be an int >= 1, got every={every!r}")

    def wrap(fn: Callable[[Run], Any]) -> Callback:
        try:
            inspect.signature(fn).bind(object())
        except TypeError:
            raise ConfigError(
                f"{getattr(fn, '__name__', fn)}{inspect.signature(fn)} must accept one argument, "
                "the run"
            ) from None
        return _FunctionCallback(event, fn, every)

    return wrap


def _fmt(metrics: dict[str, Any], keys: list[str] | None = None) -> str:
    items = [(k, metrics[k]) for k in (keys or metrics) if k in metrics]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


class ProgressBar(Callback):
    """A tqdm progress bar (widget in notebooks, text elsewhere) with ETA and the live loss.

    One bar per epoch in epoch mode, one bar for the run in step mode; its postfix is refreshed at
    log intervals only. Drawn on stderr (or `file`), and not drawn where stderr is no terminal and
    no notebook shows it (a log file, a pipe): its redrawn frames would run into the log's lines
    there, which say what the bar would.
    """

    def __init__(self, *, leave: bool = True, file: IO[str] | None = None) -> None:
        self.leave, self.file, self.bar = leave, file, None

    def _open(self, run: Run, total: int | None, initial: int, desc: str) -> None:
        with warnings.catch_warnings():
            # in a notebook without ipywidgets tqdm.auto falls back to a text bar: that is the plan
            warnings.filterwarnings("ignore", message="IProgress not found")
            from tqdm.auto import tqdm

            if self.file is None and not _shown(sys.stderr):
                return
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                leave=self.leave,
                file=self.file or sys.stderr,
                dynamic_ncols=True,
                unit="batch",
            )

    def on_train_begin(self, run: Run) -> None:
        if run.options.evaluation.run_mode == "step":
            k = run.state.options.accumulate_steps
            total = run.total_steps * k if run.total_steps else None
            self._open(run, total, run.batches, "train")

    def on_epoch_begin(self, run: Run) -> None:
        if run.options.evaluation.run_mode == "epoch":
            self._open(run, run.batches_per_epoch, run.batch, f"epoch {run.epoch}")

    def on_batch_end(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if run.logs is not None:
                self.bar.set_postfix_str(_fmt(run.logs, ["loss", "lr"]), refresh=False)

    def on_eval_end(self, run: Run) -> None:
        if self.bar is not None and run.eval_metrics:
            self.bar.set_postfix_str(
                _fmt({**(run.logs or {}), **run.eval_metrics}, ["loss", "val_loss"]), refresh=False
            )

    def on_epoch_end(self, run: Run) -> None:
        if run.options.evaluation.run_mode == "epoch":
            self._close()

    def on_train_end(self, run: Run) -> None:
        self._close()

    def on_exception(self, run: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _shown(stream: Any) -> bool:
    """Whether a bar drawn on `stream` is seen as one: a terminal, or a notebook's widget."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    # a notebook's kernel, Jupyter's shell or one made from it (Colab's): tqdm.auto draws a widget
    if any(kind.__name__ == "ZMQInteractiveShell" for kind in type(shell).__mro__):
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


class JsonlLogger(Callback):
    """Append one JSON line per log interval, per evaluation and per epoch to `path` (flushed).

    Each line has ``kind`` (``"train"``, ``"eval"``, ``"epoch"``) and the row's metrics; NaN and Inf
    are written as strings (``"nan"``, ``"inf"``) so they are not lost as ``null``. When training
    begins the file is rewritten from the run's history (empty for a new run, restored for a resumed
    one), so rows an interrupted process logged after its last checkpoint appear once. `path` must
    be a regular file or a path to create one at: a directory, a device or a FIFO is refused with
    a `ConfigError` (the open never waits for a FIFO's reader).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._seen = {"train": 0, "eval": 0, "epoch": 0}

    def on_train_begin(self, run: Run) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _log_file(self.path)
        self._seen = {k: 0 for k in run.history.rows}
        self._flush_new(run)

    def _flush_new(self, run: Run) -> None:
        if self._file is None:
            return
        new = []
        for order, (kind, rows) in enumerate(run.history.rows.items()):
            new += [
                (row.get("step", math.inf), order, n, kind, row)
                for n, row in enumerate(rows[self._seen.get(kind, 0) :])
            ]
            self._seen[kind] = len(rows)
        # in the run's order (a resumed run's history, written at once: by step, a step's
        # training row before its evaluation, its evaluation before its epoch's row)
        for *_, kind, row in sorted(new, key=lambda r: r[:3]):
            clean = {
                k: (
                    str(v)
                    if isinstance(v, float) and v != v or v in (float("inf"), float("-inf"))
                    else v
                )
                for k, v in row.items()
            }
            self._file.write(orjson.dumps({"kind": kind, **clean}) + b"\n")
        self._file.flush()

    def on_batch_end(self, run: Run) -> None:
        if run.logs is not None:
            self._flush_new(run)

    def on_eval_end(self, run: Run) -> None:
        self._flush_new(run)

    def on_epoch_end(self, run: Run) -> None:
        self._flush_new(run)

    def on_train_end(self, run: Run) -> None:
        self._flush_new(run)
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(self, run: Run) -> None:
        self.on_train_end(run)  # the rows logged before the error are kept


def _log_file(path: Path) -> IO[bytes]:
    """`path` opened to be rewritten, refused unless a regular file (nothing is truncated then).

    Opened without blocking: a FIFO nobody reads would hold the open (and the run) forever, and a
    device such as ``/dev/full`` fails every write.
    """
    problem = regular_file_problem("the log file", path)
    if problem is not None:
        raise ConfigError(problem)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:  # ENXIO: a FIFO made since, with no reader
        raise ConfigError(
            f"the log file {str(path)!r} cannot be opened to write ({e.strerror}): give a regular "
            "file"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"the log file {str(path)!r} became no regular file: give a file")
    os.set_blocking(fd, True)
    os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


class ConsoleLogger(Callback):
    """Print progress lines.

    Levels: ``"minimal"`` (one line per epoch and evaluation), ``"standard"`` (also every log
    interval), ``"verbose"`` (adds gradient norm, timings and memory).
    """

    def __init__(
        self,
        level: Literal["minimal", "standard", "verbose"] = "standard",
        *,
        file: IO[str] | None = None,
    ) -> None:
        if level not in ("minimal", "standard", "verbose"):
            raise ConfigError(
                f"level must be 'minimal', 'standard' or 'verbose', got level={level!r}"
            )
        self.level, self.file = level, file

    def _print(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.file or sys.stdout)

    def on_batch_end(self, run: Run) -> None:
        if run.logs is not None and self.level != "minimal":
            keys = ["loss", "lr"] + (
                ["grad_norm", "samples_per_s", "step_time_ms", "memory_mib"]
                if self.level == "verbose"
                else []
            )
            self._print(f"step {run.step} epoch {run.epoch}: {_fmt(run.logs, keys)}")

    def on_eval_end(self, run: Run) -> None:
        if run.eval_metrics:
            self._print(f"eval @ step {run.step}: {_fmt(run.eval_metrics)}")

    def on_epoch_end(self, run: Run) -> None:
        row = run.history.last("epoch")
        if row:
            self._print(
                f"epoch {row['epoch']} done: {_fmt({k: v for k, v in row.items() if k != 'epoch'})}"
            )


class TensorBoardLogger(Callback):
    """Write scalars to TensorBoard (needs ``pip install functrain[tensorboard]``)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None  # a SummaryWriter once the run begins (tensorboard is optional)

    def on_train_begin(self, run: Run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "TensorBoardLogger needs tensorboard: pip install 'functrain[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(str(self.log_dir))

    def _scalars(self, prefix: str, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def on_batch_end(self, run: Run) -> None:
        if self.writer is not None and run.logs is not None:
            self._scalars("train", run.logs, run.step)

    def on_eval_end(self, run: Run) -> None:
        if self.writer is not None and run.eval_metrics:
            self._scalars("eval", run.eval_metrics, run.step)

    def on_train_end(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_exception(self, run: Run) -> None:
        self.on_train_end(run)


class Profiler(Callback):
    """Profile a window of steps with `torch.profiler` and write a trace (Perfetto / TensorBoard).

    Args:
        trace_dir: where the trace files go (``*.pt.trace.json``, open in ui.perfetto.dev).
        wait: steps to skip first; warmup: steps recorded but discarded; active: steps recorded.
            A step is an update: under gradient accumulation, the batches of its window together
            (the profiler steps at the batch that completes one).
        record_shapes / profile_memory / with_stack: as `torch.profiler.profile`.
    """

    def __init__(
        self,
        trace_dir: str | Path,
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        self.trace_dir = Path(trace_dir)
        self.kwargs: dict[str, Any] = dict(
            record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack
        )
        self.window = dict(wait=wait, warmup=warmup, active=active, repeat=1)
        self.prof: Any = None
        self.traces: list[Path] = []

    def on_train_begin(self, run: Run) -> None:
        import torch.profiler as tp

        self.trace_dir.mkdir(parents=True, exist_ok=True)

        def handler(prof: Any) -> None:
            path = self.trace_dir / f"trace-step{run.step}-{int(time.time())}.pt.trace.json"
            prof.export_chrome_trace(str(path))
            self.traces.append(path)

        # acc_events: one window, so nothing to accumulate; without it torch 2.11 warns at every
        # window that events are cleared at the end of each cycle
        self.prof = tp.profile(
            schedule=tp.schedule(**self.window),
            on_trace_ready=handler,
            acc_events=True,
            **self.kwargs,
        )
        self.prof.__enter__()

    def on_batch_end(self, run: Run) -> None:
        if self.prof is not None and run.micro == 0:  # an update's last batch
            try:
                self.prof.step()
            except BaseException:
                # a step that raised midway (preparing the trace, say) leaves torch's profiler
                # half set up: exiting it then starts a trace never prepared, which crashes the
                # process (a segmentation fault), so the run's end leaves it alone
                self.prof = None
                raise

    def on_train_end(self, run: Run) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def on_exception(self, run: Run) -> None:
        self.on_train_end(run)


class LRMonitor(Callback):
    """Record the learning rate (and plateau scale) at each log interval in `self.values`."""

    def __init__(self) -> None:
        self.values: list[tuple[int, float]] = []

    def on_batch_end(self, run: Run) -> None:
        if run.logs is not None and "lr" in run.logs:
            from functrain.optim.metrics import transform_metrics

            # the step's metrics do not carry the plateau scale: read it from the state (a log
            # interval)
            scale = transform_metrics(run.state.opt_state).get("lr_scale")
            lr = run.logs["lr"] * (float(scale) if scale is not None else 1.0)
            self.values.append((run.step, lr))
