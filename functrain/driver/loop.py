"""The driver's loop: fetch a batch, step, maybe log, maybe evaluate, maybe save, fire events.

`fit` builds a `Loop` and runs it. The loop counts on the host (steps, epochs, position in the
epoch: read from the state once, at the start) so that nothing in it waits on the device except
at log intervals, evaluations and saves. What it records lives in a `Ledger`, which is written
into ``state.driver`` before every save.
"""

from __future__ import annotations

import functools
import gc
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from functrain.checkpoint.manager import CheckpointManager
from functrain.core.compiled import CompiledStep, compile_step
from functrain.core.stacked import host_count, member_columns
from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.distributed.data_parallel import gather_objects
from functrain.driver.arguments import raise_empty_epoch
from functrain.driver.callbacks import Run, runs_users_code
from functrain.driver.data import (
    IterableSource,
    MemberSource,
    StatefulSource,
    samples_per_member,
    to_device,
)
from functrain.driver.evaluation import evaluate
from functrain.driver.ledger import Ledger, memory_columns
from functrain.driver.options import FitOptions
from functrain.driver.preemption import STOP_REASONS, Preempted, StopSignals, stopped_how
from functrain.errors import ConfigError, DonatedStateError, NonFiniteError
from functrain.layout import storage_users
from functrain.optim.metrics import transform_metrics
from functrain.optim.plateau import observe_plateau
from functrain.optim.wrappers import check_skip_limits

__all__ = ["Loop"]

# the stop reasons of a run ended by a non-finite value: nothing is saved after them
NONFINITE_STOPS = ("nonfinite_val_loss", "nonfinite_loss")


class Loop:
    """One run of `fit` over its data, from the state's position to a stop reason."""

    def __init__(
        self,
        state: TrainState,
        train: Any,
        evals: Any,
        manager: CheckpointManager | None,
        hooks: list[Any],
        options: FitOptions,
        *,
        tests: Any = None,
        device: torch.device | None = None,
        resumed_from: str | None = None,
    ) -> None:
        self.options = options
        self.stopping, self.evaluating = options.stopping, options.evaluation
        self.tests = tests  # evaluated with each evaluation (fit's test_every_eval)
        self.resumed_from = resumed_from  # the checkpoint a resumed run goes on from
        self.device = device or state.device
        self.train, self.evals, self.manager, self.hooks = train, evals, manager, hooks
        compiled = options.execution.compile  # False, True or a compile_step() of the caller's
        self.step_fn = (
            compiled
            if isinstance(compiled, CompiledStep)
            else compile_step()
            if compiled
            else train_step
        )
        # the optimizer's own metrics measure updates, as the rate does (averaged over updates)
        own = set(transform_metrics(state.opt_state)) - {"skipped"}
        self.ledger = Ledger.from_tree(
            state.driver, self.stopping.early_stopping, own, stacked=bool(state.members)
        )
        self.state = state
        # before the first step the state is the one the run starts from, or shares its tensors
        # (`replace` keeps them): `fit`'s caller holds it, unless `donate` says it was given up
        self._donate_start = options.execution.donate
        self._kept_weights = False  # whether the last step found its weights held (`_owns_state`)
        self._users: list[int] = []  # `_storage_users_now` as the last step left them
        # a hook of the user's could keep the weights (functrain's own keep nothing of the state),
        # and so could an evaluation between steps (its eval_fn, or the loss_fn, given the model)
        self._watch_weights = (
            evals is not None or tests is not None or any(map(runs_users_code, hooks))
        )
        self.stepped = False  # whether a step ran (and so whether `donate` took the start state)
        # an epoch resumed on another number of ranks (its rest dealt anew), which may be empty
        self.dealt_epoch: int | None = None
        self.main = state.dist is None or state.dist.rank == 0
        # the one read of the counters; from here on the driver counts on the host
        self.step, self.micro, self.epoch, self.pos = (
            host_count(x) for x in (state.step, state.micro_step, state.epoch, state.epoch_step)
        )
        # a stacked state (functrain.stack): its metrics are logged per member
        self.stacked = bool(state.members)
        follow = getattr(train, "follow_setup", None)
        if follow is not None and self.ledger.data is not None:
            follow(self.ledger.data)  # an earlier functrain's checkpoint: draw as its run did
        # a state given rather than restored takes other data at an epoch's start (one fit per
        # phase of a curriculum): the position it holds is then the old data's, not this data's
        same_data = self.ledger.use_data(
            train.setup(),
            at_epoch_start=self.pos == 0,
            checkpoint=manager.latest() if manager is not None else None,
            legacy=getattr(train, "legacy_setup", dict)(),
            regroups=getattr(train, "regroups", False),
            restored=resumed_from is not None,
        )
        if (
            train.saves_position
        ):  # data whose position a checkpoint holds (its state, or a digest of what it consumed)
            train.resume(state.driver.get("source") if same_data else None, state.dist)
            resumed_at = getattr(train, "resumed_at", None)
            moved = resumed_at(self.epoch, self.pos) if resumed_at is not None else None
            if moved is not None:
                # resumed mid-epoch on another number of ranks: the position of the samples
                # consumed, counted in this run's batches (`DataLoaderSource.resume`), 0 where
                # they fill no batch of this run; the rest of the epoch may hold no batch
                self.dealt_epoch = self.epoch
                self.pos = moved
                self.state = state = state.replace(
                    epoch_step=torch.full_like(state.epoch_step, moved)
                )
            if manager is not None:
                # a state a checkpoint cannot store is refused now, not at the first save. After the
                # resume: asked before it, a StatefulDataLoader starts its workers, and the load
                # would throw away the batches they prefetched (samples read for nothing)
                train.state_tree()
        self.k = state.options.accumulate_steps
        # callbacks read the options as `run.options`, and the plain ones by name as `run.config`
        config = options.run_config() | {
            "accumulate_steps": self.k,
            "accumulate_convention": state.options.accumulate_convention,
            "resumed_from": resumed_from,
        }
        self.run_ctx = Run(state, self.ledger.history, config, options)
        self.stop_reason: str | None = state.driver.get("stop_reason")
        self.signals = StopSignals(enabled=False)  # those `run` takes while it runs
        self.saved: Path | None = None  # the checkpoint the last save wrote (or writes, async)
        self.interrupted = False  # a signal or a KeyboardInterrupt ended the run
        # False from a step's start until its update's evaluation, saves and hooks are done (an
        # epoch's end, the final save likewise): an interrupt landing then (a second Ctrl-C)
        # finds records that miss part of that update, which no checkpoint may hold
        self._settled = True
        self.kept_previous = False  # an interrupt at such a moment saved nothing
        # a batch was drawn that no step has consumed yet: the state of data that saves its own
        # (state_dict()) is then past it, and an interrupt saving it would skip that batch
        self._drawn = False
        # the length of the partial window under way with partial_window="over_length", else None
        self._short_window: int | None = None
        self._saved_at: tuple[int, int, int, dict[str, Any]] | None = None
        self._saved_metrics: dict[str, float] | None = None  # the metrics the last save recorded
        self._epoch_t0 = time.perf_counter()
        if resumed_from is not None:
            # the checkpoint holds the state as it stands: a resumed run that had finished does
            # not save it again (nor fire on_save for it a second time)
            self._saved_at = self._position()
        max_time = self.stopping.max_time
        # the wall-clock budget of this call (fit's max_time), from the start of its loop
        self._deadline = time.monotonic() + max_time if max_time is not None else None

    def resumed_line(self) -> str | None:
        """Where a resumed run goes on from: the checkpoint and the position; None for a new run.

        Example: ``resumed from ckpt/step-00000012 at step 12 (epoch 1, batch 4)``.
        """
        if self.resumed_from is None:
            return None
        where = f"step {self.step} (epoch {self.epoch}, batch {self.pos})"
        return f"resumed from {self.resumed_from} at {where}"

    def _run_now(self) -> Run:
        """The run as hooks see it, at the loop's state and position now."""
        ctx = self.run_ctx
        ctx.held, ctx.epoch, ctx.step, ctx.batch = self.state, self.epoch, self.step, self.pos
        ctx.micro = self.micro
        return ctx

    def fire(self, hook: str) -> None:
        """Call `hook` on every callback, with the run as it stands.

        A `KeyboardInterrupt` a callback raises is taken as Ctrl-C is (`StopSignals.ask`): the
        other callbacks get the hook, the update under way ends with its evaluation and saves, and
        the run stops where a signal would stop it. After a real signal, one (the second Ctrl-C,
        landing in a callback) propagates at once, as does one under torch.distributed, as a
        signal does there.
        """
        ctx = self._run_now()
        for cb in self.hooks:
            fn = getattr(cb, hook, None)
            if fn is None:
                continue
            try:
                fn(ctx)
            except KeyboardInterrupt:
                # after a real signal, a second Ctrl-C (a callback that hangs) acts at once, as
                # does one under torch.distributed, as a signal does there
                # (where the run's handler is not Ctrl-C's, in a notebook or a thread, a second
                # interrupt is taken for one)
                signals = self.signals
                second = signals.signalled or (
                    signals.received is not None and signal.SIGINT not in signals.handling
                )
                if self.state.dist is not None or second:
                    raise
                self.signals.ask(signal.SIGINT)
        if ctx.state.user is not self.state.user:  # a hook assigned run.user
            self.state = self.state.replace(user=ctx.state.user)
        if ctx.should_stop and self.stop_reason is None:
            self.stop_reason = ctx.stop_reason

    def run(self) -> None:
        """Train epoch after epoch until a limit, early stopping, a callback or a signal ends it.

        A run ended by an exception fires ``on_exception`` instead of ``on_train_end``, so
        callbacks close what they opened; the exception then propagates as it was. A stop asked
        by a signal (`functrain.driver.preemption`: Ctrl-C, SIGTERM, SIGUSR1; in the main thread,
        taken between updates, a second one of a kind acting at once) or a `KeyboardInterrupt`
        (raised by a callback: taken as Ctrl-C, `fire`) ends the run too, with ``on_exception``
        (the last hook: the interrupt's save fires no ``on_save``), and keeps what it
        trained: the state after the last completed update, saved where the run has a
        checkpoint directory, stop reason ``"interrupted"`` (``"terminated"`` for SIGTERM,
        ``"requeue"`` for SIGUSR1: `fit` then raises `Preempted`). Raised inside a donated step
        that had begun writing the state, the interrupt propagates (there is no completed state
        to hand back). One that lands after a step, before its update is done (a second Ctrl-C in
        its evaluation, saves or hooks, an epoch's end or the final save), or between a batch's
        draw and its step's end on data that saves its own state (``state_dict()``, then past
        that batch), saves nothing: a resume goes on from the last checkpoint.
        """
        # ranks would stop at different updates: under torch.distributed a signal acts at once
        with StopSignals(enabled=self.state.dist is None) as self.signals:
            try:
                self._run()
            except (KeyboardInterrupt, Preempted) as error:
                self._fire_exception(error)
                self._keep_interrupted(error)
            except BaseException as error:
                self._fire_exception(error)
                raise

    def _keep_interrupted(self, error: KeyboardInterrupt | Preempted) -> None:
        """After an interrupt: the state in hand kept as the run's, and saved."""
        try:
            self.state.check_live("fit")
        except DonatedStateError:
            note = (
                "fit was interrupted inside a donated step: its state is gone; resume from "
                "the last checkpoint (fit(..., checkpoint_dir=..., resume=True))"
            )
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(note)
            raise error from None
        signum = error.signum if isinstance(error, Preempted) else signal.SIGINT
        self.stop_reason, self.interrupted = STOP_REASONS[signum], True
        if not self._settled or (self._drawn and self._keeps_own_state()):
            # inside an update's evaluation, saves or hooks, an epoch's end or the final save (a
            # second Ctrl-C acts at once): the records miss part of what the uninterrupted run
            # does there, so nothing is saved; a resume goes on from the last checkpoint. So too
            # between a batch's draw and its step's end on data whose state is past that batch
            self.kept_previous = True
            return
        if self.ledger.window.count:
            self._log(partial=True)
        self.state = self.state.replace(driver=self._driver_tree())
        if self.state.dist is None:  # a save is collective: the other ranks went on
            # no on_save: on_exception was the run's last hook, and a save the uninterrupted run
            # does not make must not write into the state (a resumed run is that run)
            self._save(announce=False)

    def _keeps_own_state(self) -> bool:
        """Whether checkpoints hold the training data's own state (``state_dict()``), taken as it
        is when saved, rather than a count the loop keeps."""
        sources = self.train.sources if isinstance(self.train, MemberSource) else [self.train]
        return any(isinstance(s, StatefulSource) for s in sources)

    def stopped_line(self) -> str | None:
        """Where a run a signal (or a `KeyboardInterrupt`) stopped goes on from; None otherwise.

        Example: ``terminated (SIGTERM) at step 40 (epoch 0, batch 40): saved
        ckpt/ckpt-000000040-000000040; fit(..., resume=True) goes on from it``.
        """
        preempted = self.signals.preempted_by
        if not self.interrupted and preempted is None:
            return None
        how = stopped_how(preempted if preempted is not None else signal.SIGINT)
        where = f"step {self.step} (epoch {self.epoch}, batch {self.pos})"
        if self.manager is None:
            kept = "nothing was saved (no checkpoint_dir)"
        elif self.kept_previous:
            kept = (
                "nothing was saved (it came before the update under way, its evaluation, saves "
                "and hooks were done); fit(..., resume=True) goes on from the last checkpoint"
                + (f", {self.saved}" if self.saved is not None else "")
            )
        elif self.saved is None:
            kept = "nothing was saved"
        else:
            kept = f"saved {self.saved}; fit(..., resume=True) goes on from it"
        return f"{how} at {where}: {kept}"

    def _fire_exception(self, error: BaseException) -> None:
        ctx = self._run_now()
        ctx.exception = error
        for cb in self.hooks:
            fn = getattr(cb, "on_exception", None)
            if fn is None:
                continue
            try:
                fn(ctx)
            except Exception as hook_error:  # noqa: BLE001 - the run's own error is the one to propagate
                note = (
                    f"{type(cb).__name__}.on_exception also failed: {type(hook_error).__name__}: "
                    f"{hook_error}"
                )
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(note)
                else:
                    print(note, file=sys.stderr)

    def _run(self) -> None:
        ctx = self.run_ctx
        ctx.batches_per_epoch = (
            len(self.train)
            if not isinstance(self.train, (IterableSource, MemberSource)) or self.train.has_len()
            else None
        )
        stopping = self.stopping
        ctx.total_steps = stopping.max_steps
        closes = self.options.batching.partial_window != "carry"
        if closes and ctx.batches_per_epoch is None:
            raise ConfigError(
                f"partial_window={self.options.batching.partial_window!r} closes the window at an "
                f"epoch's last batch, but the training data ({type(self.train).__name__}) has no "
                "len() to tell which batch is last: give data with a len(), or leave "
                "partial_window out"
            )
        if ctx.total_steps is None and ctx.batches_per_epoch and stopping.max_epochs is not None:
            per_epoch = ctx.batches_per_epoch
            # a closed partial window is an update of its own
            updates = -(-per_epoch // self.k) if closes else per_epoch / self.k
            ctx.total_steps = int(updates * stopping.max_epochs)
        ctx.batches = self.epoch * (ctx.batches_per_epoch or 0) + self.pos
        self.fire("on_train_begin")
        self._stop_if_interrupted()
        while self.stop_reason is None:
            self.stop_reason = self._limit_reached()
            if self.stop_reason is not None:
                break
            self.fire("on_epoch_begin")
            if self._train_epoch():
                self._end_epoch()
                self._stop_if_interrupted()
        self._stop_if_interrupted()
        self._finish()

    def _owns_state(self) -> bool:
        """Whether the loop alone holds its state, so the step may take it (``donate=True``).

        Not the state `fit` was given, nor one sharing its tensors (a callback's ``run.user``
        before the first step), unless ``fit(donate=True)``; nor one a callback kept from
        ``run.state``: those stay valid, and that step runs pure.
        """
        if self.state.options.differentiable:
            return False  # its tensors are the inputs of its graph: never written into
        if not self.stepped:
            return self._donate_start
        # self.state, and the run as hooks last saw it
        held = 1 + (self.run_ctx.state is self.state)
        # Why a reference count: whoever else holds the state (the caller, a callback, a user's
        # list) is code the loop cannot ask, and a donated state's tensors are overwritten, so
        # donating one that is still held would corrupt it. Counting references answers without
        # their cooperation and errs one way only: an extra reference makes the step pure, never
        # the reverse. getrefcount counts its own argument too.
        if sys.getrefcount(self.state) - 1 > held:
            return False
        if not self._watch_weights:
            return True
        # nor one whose weights a callback kept rather than the state (its parameters' mapping,
        # a plain dict of them, a weight, an EMA weight): the step would write them. Where the
        # count finds them held, a collection first drops what only garbage holds (a compilation's
        # leftovers): once, until they are found unheld again
        if not self._weights_kept():
            self._kept_weights = False
            return True
        if self._kept_weights:
            return False
        self._kept_weights = True
        gc.collect()
        return not self._weights_kept()

    def _weights_kept(self) -> bool:
        """Whether anything but the state holds its parameters' mapping, a weight or an EMA
        weight (each held once by the state: its mapping, its list)."""
        params = self.state.params
        if sys.getrefcount(params) - 1 > 2:  # (and `params`)
            return True
        ema = self.state.ema_state
        kept = (*params.values(), *getattr(ema, "average", ()))
        if any(sys.getrefcount(t) - 1 > 3 for t in kept):  # (and `kept`, `t`)
            return True
        # nor one a tensor made since the step aliases (`.detach()`, `.data`, a view, a numpy
        # array: a tensor of its own on the weight's storage, which the count above misses)
        now = self._storage_users_now()
        return len(now) != len(self._users) or any(
            u > u0 for u, u0 in zip(now, self._users, strict=True)
        )

    def _storage_users_now(self) -> list[int]:
        """How many tensors use each weight's and EMA weight's storage."""
        state = self.state
        return storage_users([*state.params.values(), *getattr(state.ema_state, "average", ())])

    def _limit_reached(self) -> str | None:
        # checked before each epoch (a resumed run that had already finished takes no further
        # step), after each update and at each epoch's end
        stopping = self.stopping
        if stopping.max_epochs is not None and self.epoch >= stopping.max_epochs:
            return "max_epochs"
        if stopping.max_steps is not None and self.step >= stopping.max_steps:
            return "max_steps"
        if self.ledger.early is not None and self.ledger.early.should_stop:
            return "early_stopping"
        return None

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if the run stopped inside it."""
        self._epoch_t0 = time.perf_counter()
        start, trained = self.pos, False
        for batch in self.train.epoch(self.epoch, start=self.pos):
            self._drawn = True
            batch = to_device(batch, self.device)
            # (of a PerMember batch, each member's slice's; as the state's samples= counts them)
            n = samples_per_member(batch, self.state.options.samples)
            trained = trained or n > 0
            if n == 0:
                warnings.warn(
                    f"skipping an empty batch at epoch {self.epoch}, position {self.pos}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.ledger.empty_batches += 1
                self._drawn = False
                self.pos += 1
                self.state = self.state.replace(epoch_step=self.state.epoch_step + 1)
                continue
            self.fire("on_batch_begin")
            self._close_partial_window()
            self._step(batch, n)
            if self.stop_reason is not None:
                return False
        if start == 0 and not trained and self.dealt_epoch != self.epoch:
            raise_empty_epoch(
                self.epoch
            )  # else a run bounded by max_steps alone would loop for ever
        return True

    def _close_partial_window(self) -> None:
        """At the first batch of an epoch's last, partial window: make it end with the epoch.

        With ``partial_window="over_n"`` or ``"over_length"``, where the batches left in the epoch
        are fewer than a window (`TrainState.closing_window`).
        """
        how = self.options.batching.partial_window
        total = self.run_ctx.batches_per_epoch
        if how == "carry" or total is None:
            return
        if self.micro != 0:
            # resumed inside the closing window (saved by an interrupt in its step or between its
            # batches): the windows of an epoch start at multiples of N, so it is the last one,
            # and under "over_length" its loss is divided by its length again
            short = total % self.k
            if how == "over_length" and self._short_window is None and short:
                if self.pos >= total - short:
                    self._short_window = short
            return
        left = total - self.pos
        if 0 < left < self.k:
            self.state = self.state.closing_window(left)
            self.micro = self.k - left
            if how == "over_length":
                self._short_window = left

    def _stepped(self, state: TrainState, batch: Any, donate: bool) -> tuple[TrainState, Any]:
        """The step; in a closed partial window under ``partial_window="over_length"``, taken as
        a window of its own length (the loss divided by it, as Hugging Face's `Trainer` does)."""
        short = self._short_window
        if short is None:
            return self.step_fn(state, batch, donate=donate)
        n = state.options.accumulate_steps
        at = self.micro - (n - short)  # the batch's place in the short window
        # the transform as it is (its window of N): the step counts the short window by the options
        shortened = state.with_statics(
            options=attrs.evolve(state.options, accumulate_steps=short)
        ).replace(micro_step=torch.full_like(state.micro_step, at))
        if at == 0:  # the step counts the short window's batches from its start
            first = int(state.step) * n
            window = shortened.opt_state.renoted(first + n - short - 1, int(state.step) * short - 1)
            shortened = shortened.replace(opt_state=window)
        del state  # the loop's reference: `shortened` is the one the step may take
        new, metrics = self.step_fn(shortened, batch, donate=donate)
        if at + 1 == short:
            self._short_window = None
        # the window as N counts it again: the step's counter ran modulo the short window's length
        back = torch.full_like(new.micro_step, (self.micro + 1) % n)
        return new.with_statics(options=attrs.evolve(new.options, accumulate_steps=n)).replace(
            micro_step=back
        ), metrics

    def _step(self, batch: Any, n: int) -> None:
        try:
            donate = self._owns_state()  # asked first: an argument being passed is a reference too
            self.stepped = True
            self._settled = False
            try:
                self.state, metrics = self._stepped(self.state, batch, donate)
            except BaseException:
                # (raised in the step: the state in hand and the records are those before it)
                self._settled = True
                raise
            if self._watch_weights:  # before any hook: as the step left them
                self._users = self._storage_users_now()
            self._drawn = False
        except NonFiniteError as e:
            raise NonFiniteError(
                f"halted at update {self.step + 1} (epoch {self.epoch}, batch {self.pos}): {e}"
            ) from e
        self.pos += 1
        self.run_ctx.batches += 1
        self.micro = (self.micro + 1) % self.k
        update_done = self.micro == 0
        self.ledger.add_step(member_columns(metrics) if self.stacked else metrics, n, update_done)
        self.run_ctx.logs = None
        if update_done:
            self.step += 1
            if self.step % self.options.logging.log_every == 0:
                self._log()
        self.fire("on_batch_end")
        self.run_ctx.logs = None
        if not update_done:
            self._settled = True
            return
        evaluating, save_every = self.evaluating, self.options.checkpointing.save_every
        if (
            evaluating.run_mode == "step"
            and self.evals is not None
            and self.step % evaluating.eval_every == 0
        ):
            self._evaluate()
        if save_every and self.step % save_every == 0:
            self._save()
        self._save_hook_writes()
        self.stop_reason = self.stop_reason or self._limit_reached()
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self.stop_reason = self.stop_reason or "max_time"
        self._settled = True
        self._stop_if_interrupted()

    def _stop_if_interrupted(self) -> None:
        """End the run here if a signal came during what just finished (an update, an
        evaluation, a save): `run` keeps the state as it is now."""
        received = self.signals.received
        if received == signal.SIGINT:
            raise KeyboardInterrupt
        if received is not None:
            raise Preempted(received)

    def _log(self, partial: bool = False) -> None:
        check_skip_limits(self.state.opt_state)
        row = {
            "step": self.step,
            "epoch": self.epoch,
            **self.ledger.window.flush(reset=not partial),
            **memory_columns(self.options.logging.memory, self.device),
        }
        if partial:
            row["partial"] = True
        self._check_lr(row.get("lr", 0.0))
        self.ledger.history.add("train", row)
        self.run_ctx.logs = row
        if self.stopping.stop_on_nonfinite == "train" and not math.isfinite(row["loss"]):
            self.stop_reason = self.stop_reason or "nonfinite_loss"

    def _check_lr(self, lr: float) -> None:
        """Raise if a learning rate read at a log interval, epoch end or save is not finite.

        The step never reads it back; a NaN or Inf rate makes every parameter NaN in the next
        update, and the last checkpoint written before it is kept.
        """
        if not math.isfinite(lr):
            raise ConfigError(
                f"the learning rate was {lr} in an update up to step {self.step} (epoch "
                f"{self.epoch}): the schedule gives a non-finite value there; fix the schedule "
                "(e.g. guard its divisions) and resume from the last checkpoint"
            )

    def _window_lr(self, window: Any) -> float:
        # the sum of the window's rates is finite exactly when each of them is (they are >= 0)
        return window.totals()["lr"] if window.count and "lr" in window.keys else 0.0

    def _end_epoch(self) -> None:
        self._settled = False
        self._check_lr(self._window_lr(self.ledger.epoch_sums))
        self.epoch += 1
        self.pos = 0
        self.state = self.state.replace(
            epoch=self.state.epoch + 1, epoch_step=torch.zeros_like(self.state.epoch_step)
        )
        self.ledger.end_epoch(self.epoch - 1, self.step, time.perf_counter() - self._epoch_t0)
        evaluating = self.evaluating
        if (
            evaluating.run_mode == "epoch"
            and self.evals is not None
            and self.epoch % evaluating.eval_every == 0
        ):
            self._evaluate()
        elif self.manager is not None and self.options.checkpointing.save_every is None:
            self._save()
        self.stop_reason = self.stop_reason or self._limit_reached()
        self.fire("on_epoch_end")
        self._save_hook_writes()
        self._settled = True

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        metrics = self.evaluation(self.evals, "val_")
        if self.tests is not None:
            metrics.update(self.evaluation(self.tests, "test_"))
        best_metric = self.evaluating.best_metric
        if best_metric not in metrics:
            raise ConfigError(
                f"best_metric={best_metric!r} is not among the evaluation's metrics "
                f"{sorted(metrics)}: pass one of them as best_metric, or produce it (prefixed "
                "'val_' in evaluations): a metric eval_fn (or loss_fn) returns, or a metric "
                "object in eval_metrics"
            )
        self.ledger.history.add(
            "eval",
            {
                "step": self.step,
                "epoch": self.epoch,
                **metrics,
                "eval_time_s": time.perf_counter() - t0,
            },
        )
        self.run_ctx.eval_metrics = metrics
        # the metrics the driver decides by: early stopping's target too, which Lightning's
        # EarlyStopping (check_finite=True) stops on at once rather than count as no improvement
        watched = {"val_loss", best_metric}
        if self.ledger.early is not None:
            watched.add(self.ledger.early.target)
        if self.stopping.stop_on_nonfinite != "none" and not all(
            math.isfinite(metrics[k]) for k in watched & set(metrics)
        ):
            # neither best, plateau nor early stopping can use it; the checkpoints keep the last
            # finite state
            self.stop_reason = self.stop_reason or "nonfinite_val_loss"
            self.fire("on_eval_end")
            return
        self.state = self.state.replace(
            opt_state=observe_plateau(self.state.opt_state, metrics[best_metric])
        )
        new_best = self.ledger.record_eval(
            metrics,
            self.step,
            best_metric,
            self.evaluating.mode,
            per_member=self.evaluating.best_per_member,
        )
        if self.ledger.early is not None and self.ledger.early.should_stop:
            self.stop_reason = self.stop_reason or "early_stopping"
        # with save_every, an improving evaluation still saves: that is what keeps the best weights
        if self.manager is not None and (self.options.checkpointing.save_every is None or new_best):
            self._save(metrics)
        self.fire("on_eval_end")

    def evaluation(
        self, data: Any, prefix: str, state: TrainState | None = None
    ) -> dict[str, float]:
        """`data` evaluated on the weights and, with EMA, on their average (``{prefix}ema_``).

        Of `state` (default: the loop's), with fit's `eval_fn` and `eval_metrics`.
        """
        state = self.state if state is None else state
        measure = functools.partial(
            evaluate,
            state,
            data,
            eval_fn=self.evaluating.eval_fn,
            metrics=self.evaluating.eval_metrics,
        )
        metrics = measure(prefix=prefix)
        if state.ema_state is not None:
            metrics.update(measure(use_ema=True, prefix=f"{prefix}ema_"))
        return metrics

    def _position(self) -> tuple[int, int, int, dict[str, Any]]:
        """What tells two saves apart: the place in the data, the history's rows, the user state.

        The rows of the history leave the final partial train row aside (its sums are in the
        window); the user state is there because a hook may assign it after a save.
        """
        last = self.ledger.history.last("train")
        return (
            self.epoch,
            self.pos,
            len(self.ledger.history) - bool(last and last.get("partial")),
            self.state.user,
        )

    def _saved_here(self, position: tuple[int, int, int, dict[str, Any]]) -> bool:
        return (
            self._saved_at is not None
            and self._saved_at[:3] == position[:3]
            and self._saved_at[3] is position[3]
        )

    def _driver_tree(self) -> dict[str, Any]:
        """What ``state.driver`` holds: the ledger's records and the training data's position.

        The position is there for training data whose position checkpoints hold (a
        ``state_dict()``, the digest of a DataLoader's consumed indices or of a replayed source's
        consumed batches): that position now, after the last batch
        a step consumed (the loop draws batches one at a time), each rank's own under
        torch.distributed. Without checkpoints, it is there where a run in one process stopped
        mid-epoch (`max_steps`, an interrupt) and the data's state can be stored: the next `fit`
        given the state goes on from it, with this data object or another (a stream's state
        loaded, not replayed and skipped).
        """
        driver = self.ledger.to_tree()
        if not self.train.saves_position:
            return driver
        if self.manager is not None:
            # ``{"ranks": [the source's state_tree on rank 0, rank 1, ...]}``: every rank's source
            # reads its own stream, so each rank's is gathered (a collective, at the same save on
            # every rank) and every rank holds them all
            ranks = gather_objects(self.train.state_tree(), self.state.dist)
            driver["source"] = {"ranks": ranks}
        elif self.pos != 0 and self.state.dist is None:
            try:
                driver["source"] = {"ranks": [self.train.state_tree()]}
            except ConfigError:
                pass  # a state no checkpoint could hold either: the next fit replays instead
        return driver

    def _save_hook_writes(self) -> None:
        """Save again where the hooks since the last save wrote ``run.user`` at its position.

        ``on_save``, ``on_eval_end`` and ``on_epoch_end`` fire after the save of their update or
        epoch, and a run resumed from that checkpoint does not fire them again: the checkpoint is
        written again (the same name, replaced atomically; ``on_save`` not fired again) to hold
        what they wrote.
        """
        saved = self._saved_at
        if saved is not None and saved[:3] == self._position()[:3]:
            self._save(self._saved_metrics, announce=False)

    def _save(self, metrics: dict[str, float] | None = None, announce: bool = True) -> None:
        # skip when nothing changed since the last save (an epoch end after a step's save changes
        # the state), and after a non-finite value: the checkpoints keep the last finite state
        position = self._position()
        if (
            self.manager is None
            or self.stop_reason in NONFINITE_STOPS
            or self._saved_here(position)
        ):
            return
        self._check_lr(self._window_lr(self.ledger.window))
        self.state = self.state.replace(driver=self._driver_tree())
        self._saved_metrics = metrics
        if (
            not self.main and not self.manager.sharded
        ):  # rank 0 writes; the state is the same on every rank
            self._saved_at = position
            return
        saved = self.manager.save(
            self.state, metrics=metrics
        )  # a sharded state: every rank its shards
        self._saved_at = position
        self.saved = saved
        if self.main and announce:
            self.run_ctx.saved = saved
            self.fire("on_save")

    def _finish(self) -> None:
        self._settled = False
        if self.ledger.window.count:
            # the run's last, partial log interval becomes a train row marked "partial"; the window
            # keeps its sums, so a run resumed from the final checkpoint drops that row and goes on
            self._log(partial=True)
        self.state = self.state.replace(driver=self._driver_tree())
        if self.manager is not None:
            self._save()
            self._save_hook_writes()
        # a resumed run that had finished fires it again: what it writes into run.user is in the
        # state `fit` returns, not in the checkpoint (the resume would write it twice)
        self.fire("on_train_end")
