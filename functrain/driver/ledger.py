"""What the driver records as a run goes, kept so that a resumed run is the same run.

The `Ledger` holds the host-side bookkeeping of `fit`: the history, the running sums of the
unfinished log window and epoch, the best evaluation (and, on request, each stacked member's), the
empty batches skipped and the early-stopping value. `to_tree` is written into ``state.driver``
before every save, and `Ledger.from_tree` reads it back on resume.
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections.abc import Collection, Mapping
from typing import Any

import attrs
import torch

from functrain.checkpoint.bests import mean_of, member_of
from functrain.checkpoint.state_io import register_driver_check, register_state_check
from functrain.core.state import register_driver_keys
from functrain.driver.data import source_problems
from functrain.driver.history import KINDS, History
from functrain.driver.stopping import EarlyStopping, improved
from functrain.errors import ConfigError

__all__ = ["Ledger", "MetricWindow", "is_update_metric", "memory_columns", "tree_problems"]

_SCALARS = (int, float, str, bool, type(None))

# the `fit` argument behind each entry of a data setup
_DATA_ARGUMENTS = {
    "samples": "the dataset's size (len(train_data))",
    "batches": "batches per epoch (len(train_data))",
    "batch_size": "batch_size",
    "shuffle": "shuffle",
    "drop_last": "drop_last",
    "seed": "data_seed",
    "generator_seed": "the seed of the DataLoader's generator= (generator.initial_seed(), its "
    "sampler's with it where the sampler holds its own)",
    "sampler": "the DataLoader's sampler (its type)",
    "seeds": "what a sample's random draws are seeded from ('sample': (data_seed, epoch, its "
    "index); none: (data_seed, epoch, its batch's position, rank), as an earlier functrain did)",
    "ranks": "the number of ranks the DataLoader's sampler splits each epoch over (its "
    "num_replicas; each rank's position counts batches of its own part)",
    "sampler_seed": "the seed of the DataLoader's DistributedSampler (its seed=)",
    "sampler_drop_last": "the drop_last of the DataLoader's DistributedSampler",
    "epoch_sized": "whether set_epoch(epoch) of the data, its dataset or its sampler may change "
    "an epoch's length (one of your own has set_epoch)",
    "loader_seed": "the seed of a DataLoader's epochs: data_seed mixed with the seed of its "
    "generator= (a checkpoint of an earlier functrain records only this mix)",
}
_DATA_FIT_NAMES = ("batch_size", "shuffle", "drop_last", "seed")
# entries of a data setup recorded since a later functrain than the first: a checkpoint whose
# setup lacks one predates it, and is not checked on it (its order digest still is); nor is data
# that has none (a seed no batch of it draws from, as a list's or a stateful source's)
_RECORDED_SINCE = frozenset(
    {
        "seed",
        "generator_seed",
        "shuffle",
        "sampler",
        "ranks",
        "sampler_seed",
        "sampler_drop_last",
        "epoch_sized",
    }
)
# what may change where an epoch starts, for data whose order is a function of (seed, epoch):
# nothing of the epoch is consumed yet, so regrouping it (in other batches, over other ranks)
# skips and repeats nothing
_REGROUPABLE = frozenset({"batch_size", "batches", "ranks"})

# metrics of the update a step applies rather than of its batch: the rate, the norm of the gradient
# the update used, the loss scale, the update ratios (the optimizer's own metrics are added by
# name); the per-group gradient norms (``grad_norm/<group>``) are each micro-batch's
_UPDATE_METRICS = frozenset({"lr", "grad_norm", "loss_scale"})
_UPDATE_GROUPS = ("update_ratio/", "lr/")
_MEMBER = re.compile(r"\[\d+\]$")  # a stacked state's member column: ``name[k]``


def is_update_metric(name: str, transform_metrics: Collection[str] = ()) -> bool:
    """Whether `name` measures the update a step applies (averaged over updates, not batches).

    Under gradient accumulation only the batch that ends a window applies an update; the others
    report the last update's rate and a partial window's norm, which no update used.

    Example:
        >>> names = ("lr", "lr/head", "update_ratio/0", "lr[1]", "loss", "grad_norm/0")
        >>> [is_update_metric(n) for n in names]
        [True, True, True, True, False, False]
    """
    base = _MEMBER.sub("", name)
    return base in _UPDATE_METRICS or base in transform_metrics or base.startswith(_UPDATE_GROUPS)


class MetricWindow:
    """Running sums of the per-step metrics since the last flush, kept on the device until read.

    Sums rather than a list of per-step tensors: keeping hundreds of tiny tensors alive fragments
    the allocator and slows the step (``benchmarks/README.md``). Saved in ``state.driver`` so a
    resumed run continues the same sums.

    The metrics of updates (`is_update_metric`) are summed over the batches that applied one and
    averaged over those (``updates``); the others over every batch (``count``).
    """

    def __init__(
        self, tree: dict[str, Any] | None = None, transform_metrics: Collection[str] = ()
    ) -> None:
        tree = tree or {}
        self.keys: list[str] = list(tree.get("keys", ()))
        self.sums: torch.Tensor | None = tree.get("sums")
        self.count = int(tree.get("count", 0))
        # a window saved without it counted every batch as an update
        self.updates = int(tree.get("updates", self.count))
        self.transform_metrics = frozenset(transform_metrics)
        self.samples, self.t0 = 0, time.perf_counter()
        self._masks: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def add(
        self, metrics: dict[str, torch.Tensor], samples: int, applied: bool = True
    ) -> torch.Tensor:
        """Add one step's metrics (0-d tensors); returns them stacked as the window took them (its
        `keys`), for other windows to add.

        A batch that applied no update (inside an accumulation window) adds 0 to the metrics of
        updates. The sums are float64 (`add_vector` adds the stacked values to them there).
        """
        values = list(metrics.values())
        dtypes = {v.dtype for v in values}
        # mixed dtypes meet in float64, the sums' dtype: a float64 metric keeps its bits, an int64
        # count its value up to 2**53 (float32 would round both, a count from 2**24 on)
        vec = torch.stack(values if len(dtypes) == 1 else [v.double() for v in values])
        if not applied:
            # (an integer 0: integer metrics stay exact, added to the float64 sums)
            vec = torch.where(self._batch_mask(list(metrics), vec.device), vec, 0)
        vec = self.add_vector(vec, list(metrics), applied)
        self.samples += samples
        return vec

    def _batch_mask(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """True at the metrics of batches, False at those of updates (made once per key list)."""
        key = (tuple(keys), device)
        if key not in self._masks:
            flags = [not is_update_metric(k, self.transform_metrics) for k in keys]
            self._masks[key] = torch.tensor(flags, device=device)
        return self._masks[key]

    def add_vector(self, vec: torch.Tensor, keys: list[str], applied: bool = True) -> torch.Tensor:
        """Add a step's stacked metrics (named `keys`); returns them as the window took them."""
        if self.count and keys != self.keys and sorted(keys) == sorted(self.keys):
            # the same metrics in another order (a dict built in the order of a batch's tasks):
            # each is summed with its own name's, in the window's order
            vec, keys = vec[[keys.index(k) for k in self.keys]], self.keys
        if self.count and keys != self.keys:
            vec, keys = self._step_norm_apart(vec, keys)
        if not self.count:
            self.keys, self.sums, self.updates = keys, vec.double(), 0
        elif keys != self.keys:
            missing = [k for k in self.keys if k not in keys]
            added = [k for k in keys if k not in self.keys]
            raise ConfigError(
                "loss_fn must return the same metrics at every step (fit logs each one's mean "
                f"over the steps of a log interval): this step left out {missing} and added "
                f"{added}; return each metric at every step (for a task a batch leaves out, its "
                "loss as 0 beside a metric counting its samples, whose mean weights it), or log "
                "what a step may leave out from a callback"
            )
        else:
            assert self.sums is not None  # a count above 0 comes with its sums
            self.sums = self.sums + vec  # in float64 (the sums' dtype), as vec.double() adds
        self.count += 1
        self.updates += applied
        return vec

    def _step_norm_apart(
        self, vec: torch.Tensor, keys: list[str]
    ) -> tuple[torch.Tensor, list[str]]:
        """A window whose steps differ in the step's own ``grad_norm`` alone (a run resumed with
        `TrainState.create(grad_norm=...)` changed, or from a checkpoint of a version that always
        reported it): the window goes on without it, which the next window has where the steps
        report it. Any other difference is left to `add_vector` to refuse."""
        norm = "grad_norm"
        if [k for k in self.keys if k != norm] != [k for k in keys if k != norm]:
            return vec, keys
        if norm in self.keys:  # the window's sums lose the column
            assert self.sums is not None  # a count above 0 comes with its sums
            kept = [i for i, k in enumerate(self.keys) if k != norm]
            self.sums, self.keys = self.sums[kept], [k for k in self.keys if k != norm]
        if norm in keys:  # this step's norm is left out of the window
            kept = [i for i, k in enumerate(keys) if k != norm]
            vec, keys = vec[kept], [k for k in keys if k != norm]
        return vec, keys

    def totals(self) -> dict[str, float]:
        assert self.sums is not None, "totals of an empty window"
        return dict(zip(self.keys, self.sums.tolist(), strict=True))  # one host read

    def means(self) -> dict[str, float]:
        """The window's mean of each metric (``skipped`` as a total): one host read.

        The metrics of updates are means over the updates applied, and left out of a window that
        applied none.
        """
        totals = self.totals()
        out = {}
        for k, v in totals.items():
            if not is_update_metric(k, self.transform_metrics):
                out[k] = v / self.count
            elif self.updates:
                out[k] = v / self.updates
        if "skipped" in out:
            out["skipped"] = totals["skipped"]
        return out

    def flush(self, reset: bool = True) -> dict[str, float]:
        """The window's means and its speed; then start anew (unless `reset` is False)."""
        out = self.means()
        elapsed = time.perf_counter() - self.t0
        out["samples_per_s"] = self.samples / elapsed if elapsed > 0 else math.nan
        out["step_time_ms"] = 1e3 * elapsed / self.count
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self.keys, self.sums, self.count, self.updates = [], None, 0, 0
        self.samples, self.t0 = 0, time.perf_counter()

    def to_tree(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "sums": self.sums,
            "count": self.count,
            "updates": self.updates,
        }


@attrs.define
class Ledger:
    """The driver's records of a run (all of them saved in ``state.driver``)."""

    history: History
    window: MetricWindow
    epoch_sums: MetricWindow
    best: dict[str, float] | None = None
    # each member's best evaluation (`record_eval`'s per_member), None where it is not kept
    member_bests: list[dict[str, float] | None] | None = None
    empty_batches: int = 0
    early: EarlyStopping | None = None
    data: dict[str, Any] | None = (
        None  # the data setup of the run (`Batcher.setup`), None before it is known
    )

    @classmethod
    def from_tree(
        cls,
        driver: dict[str, Any],
        early: EarlyStopping | None,
        transform_metrics: Collection[str] = (),
        stacked: bool = False,
    ) -> Ledger:
        """The records saved in `driver` (empty for a fresh run); `early` takes its saved counts.

        `transform_metrics`: the names of the metrics the optimizer's state exposes, which measure
        updates (`is_update_metric`). `stacked`: the state is a stacked one; sums of a log
        interval and epoch kept for the other kind (a member `unstack` gave, trained on alone, or
        members stacked after runs of their own) are another run's, and start afresh.
        """
        history = History.from_tree(driver.get("history"))
        last = history.last("train")
        sums = {name: driver.get(name) for name in ("window", "epoch_sums")}
        kinds = [_of_members(tree) for tree in sums.values() if tree]
        if any(kind is not None and kind is not stacked for kind in kinds):
            sums = {}
        elif last is not None and last.get("partial"):
            history.rows["train"].pop()  # its window's sums are restored: the run goes on with them
        return cls(
            history=history,
            window=MetricWindow(sums.get("window"), transform_metrics),
            epoch_sums=MetricWindow(sums.get("epoch_sums"), transform_metrics),
            best=driver.get("best"),
            member_bests=driver.get("member_bests"),
            empty_batches=int(driver.get("empty_batches", 0)),
            early=early.with_tree(driver.get("early_stopping")) if early is not None else None,
            data=driver.get("data"),
        )

    def to_tree(self) -> dict[str, Any]:
        """What ``state.driver`` holds."""
        driver: dict[str, Any] = {
            "history": self.history.to_tree(),
            "window": self.window.to_tree(),
            "epoch_sums": self.epoch_sums.to_tree(),
            "best": self.best,
            "empty_batches": self.empty_batches,
            "stop_reason": None,
            "data": self.data,
        }
        if self.early is not None:
            driver["early_stopping"] = self.early.to_tree()
        if self.member_bests is not None:
            driver["member_bests"] = self.member_bests
        return driver

    def use_data(
        self,
        setup: dict[str, Any],
        *,
        at_epoch_start: bool,
        checkpoint: Any = None,
        legacy: dict[str, Any] | None = None,
        regroups: bool = False,
        restored: bool = True,
    ) -> bool:
        """Record the run's data setup; a resumed run must use the one it was saved with.

        The changes allowed are those of a map-style dataset's batching at the start of an epoch
        (its batch size, and a `DataLoader`'s batches per epoch and the ranks its sampler splits
        the epoch over): the epoch's order of samples depends only on the seed and the epoch, so
        regrouping it skips and repeats nothing. A map-style dataset batched by `fit` records
        global batches, so it may also resume mid-epoch on another number of ranks, and so may a
        `DataLoader` whose sampler is a `DistributedSampler` (`regroups`). A checkpoint
        of an earlier functrain lacks entries recorded since (``seed`` of replayed data,
        ``generator_seed``, ``shuffle``, ``sampler``, ``ranks``): it is not checked on those, and
        what it held in their place (`legacy`) is compared instead; nor are those checked where
        this call's data has none. (A map-style dataset's ``seeds`` an older checkpoint lacks is
        followed instead: `Batcher.follow_setup`.) A state given to `fit` rather than restored
        from a checkpoint (one `fit` per phase of a curriculum) takes any data at an epoch's
        start: the new data's epochs start there, and its position is not the old data's.

        Args:
            setup: the data setup of this call (`Batcher.setup`, `IterableSource.setup`).
            at_epoch_start: whether the run goes on from the start of an epoch.
            checkpoint: the checkpoint resumed from, named in the error.
            legacy: this call's values of entries older checkpoints held in place of today's
                (`DataLoaderSource.legacy_setup`'s ``loader_seed``), compared where one holds them.
            regroups: whether the data deals the rest of an epoch over another number of ranks
                (`DataLoaderSource.regroups`): ``ranks``, and with it ``batches``, may then change
                mid-epoch.
            restored: whether the state was restored from a checkpoint (``resume=True``), not
                given to `fit` as it is.

        Returns:
            Whether the position the state holds in its data (``state.driver["source"]``) is
            this data's: False where a given state's data was replaced at an epoch's start.

        Raises:
            ConfigError: the setup differs from the recorded one (a resumed position would then
                point at other samples: some skipped, some repeated), naming each change and the
                    fix.
        """
        if self.data is not None:
            saved = self.data
            given = setup | {k: v for k, v in (legacy or {}).items() if k in saved}
            regroup = at_epoch_start and "samples" in setup and "samples" in saved
            dealt = regroups and saved.get("ranks") != given.get("ranks")
            changed = [
                k
                for k in sorted({*saved, *given})
                if saved.get(k) != given.get(k)
                and not (regroup and k in _REGROUPABLE)
                and not (dealt and k in ("ranks", "batches"))
                and not (
                    (k not in saved or k not in given) and _MEMBER.sub("", k) in _RECORDED_SINCE
                )
            ]
            if changed and not restored and at_epoch_start:
                self.data = setup  # new data from the epoch's start: nothing skipped or repeated
                return False
            if changed:
                raise ConfigError(
                    _data_change_message(saved, given, changed, checkpoint)
                    if restored
                    else _given_state_message(saved, given, changed)
                )
        self.data = setup
        return True

    def add_step(
        self, metrics: dict[str, torch.Tensor], samples: int, applied: bool = True
    ) -> None:
        """Add one step's metrics to the log window and the epoch's sums (no host read).

        `applied`: whether the step applied an update (False inside an accumulation window).
        """
        vec = self.window.add(metrics, samples, applied)
        self.epoch_sums.add_vector(vec, self.window.keys, applied)

    def end_epoch(self, epoch: int, step: int, elapsed: float) -> None:
        """Record the finished `epoch`'s row: the mean of every training metric (one host read)."""
        row: dict[str, Any] = {"epoch": epoch, "step": step}
        if self.epoch_sums.count:
            row.update(self.epoch_sums.means())
        row["epoch_time_s"] = elapsed
        self.epoch_sums.reset()
        self.history.add("epoch", row)

    def record_eval(
        self,
        metrics: dict[str, float],
        step: int,
        best_metric: str,
        mode: str,
        per_member: bool = False,
    ) -> bool:
        """Count an evaluation toward best and early stopping; True when it is a new best.

        With `per_member` (a stacked state's evaluation), also toward each member's best by its
        column of `best_metric`: True as well when it is a new best of any member.
        """
        self.early = self.early.update(metrics) if self.early is not None else None
        members = per_member and self._record_members(metrics, step, best_metric, mode)
        target = metrics.get(best_metric)
        if target is None or not improved(
            target, None if self.best is None else self.best[best_metric], mode, 0.0
        ):
            return members
        self.best = {"step": step, **metrics}
        return True

    def _record_members(
        self, metrics: dict[str, float], step: int, best_metric: str, mode: str
    ) -> bool:
        """Each member's best evaluation updated with `metrics`; True when one improved.

        Member k's best holds the step and its own columns under their mean's names
        (``val_loss`` is its ``val_loss[k]``), as if it had been evaluated alone.
        """
        rows: dict[int, dict[str, float]] = {}
        for name, value in metrics.items():
            if (column := member_of(name)) is not None:
                rows.setdefault(column[1], {})[column[0]] = value
        bests = list(self.member_bests or [])
        bests += [None] * (max(rows, default=-1) + 1 - len(bests))
        mean = mean_of(best_metric)
        changed = False
        for k, row in sorted(rows.items()):
            best = bests[k]
            if mean in row and improved(row[mean], None if best is None else best[mean], mode, 0.0):
                bests[k], changed = {"step": step, **row}, True
        self.member_bests = bests
        return changed


def memory_columns(kind: str, device: torch.device) -> dict[str, float]:
    """The memory columns of a train row (`fit`'s ``memory=``), in MiB.

    ``"host"``: the process's peak resident memory. ``"device"``: also, on CUDA, the peak memory
    allocated and reserved by torch since the previous row (the peaks are reset after each read).
    ``"none"``: nothing.
    """
    if kind == "none":
        return {}
    row = {"memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if kind == "device" and device.type == "cuda":
        row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _data_change_message(
    saved: dict[str, Any], given: dict[str, Any], changed: list[str], checkpoint: Any
) -> str:
    lines = "\n  - ".join(
        f"{_DATA_ARGUMENTS.get(k, k)}: the checkpoint's run used {saved.get(k)!r}, this call gives "
        f"{given.get(k)!r}"
        for k in changed
    )
    same = ", ".join(
        hint for k in changed if k in saved and (hint := _restore_hint(k, saved)) is not None
    )
    path = repr(str(checkpoint)) if checkpoint is not None else "path"
    return (
        "resuming with another data setup would skip or repeat samples (the saved position counts "
        "batches):\n  - "
        + lines
        + "\nto resume, give the data and arguments the interrupted run used"
        + (f" ({same})" if same else "")
        + "; batch_size alone may change where an epoch starts (a checkpoint saved at an "
        "epoch's end)"
        + "; to go on with the new setup, start a new run from the checkpoint in another "
        f"checkpoint_dir: state = functrain.load({path}, like=state).replace(driver={{}}, "
        "epoch_step=torch.zeros((), dtype=torch.int64)), then fit(state, ...) (the epoch starts "
        "over in the new order)"
    )


def _given_state_message(saved: dict[str, Any], given: dict[str, Any], changed: list[str]) -> str:
    """Why a state given to `fit` in the middle of an epoch cannot go on over other data."""
    lines = "\n  - ".join(
        f"{_DATA_ARGUMENTS.get(k, k)}: the state's run used {saved.get(k)!r}, this call gives "
        f"{given.get(k)!r}"
        for k in changed
    )
    return (
        "the state given to fit is in the middle of an epoch of data of another setup, and going "
        "on from its position (state.epoch_step, which counts batches of that data) would skip "
        "or repeat samples:\n  - "
        + lines
        + "\nto start this data's epoch from its first batch, pass "
        "state.replace(epoch_step=torch.zeros((), dtype=torch.int64)) (or end the previous "
        "phase at an epoch's end: max_epochs rather than max_steps); to finish the epoch, give "
        "the data and arguments the state's run used"
    )


def _restore_hint(key: str, saved: dict[str, Any]) -> str | None:
    """What gives `key` the value the checkpoint's run used (None where no argument does)."""
    value = saved[key]
    loader = "sampler" in saved  # a DataLoader's setup: its own arguments set these
    if key == "shuffle" and loader:
        sampler = str(saved["sampler"]).rpartition(".")[2]
        if sampler in ("RandomSampler", "SequentialSampler"):  # what DataLoader(shuffle=) makes
            return f"DataLoader(..., shuffle={value!r})"
        return f"{sampler}(..., shuffle={value!r})"
    if key == "generator_seed" and isinstance(value, int):
        return f"DataLoader(..., generator=torch.Generator().manual_seed({value}))"
    if key == "generator_seed" and value is None:
        return "a DataLoader without generator= (and a sampler without one)"
    if key == "generator_seed":
        return f"the DataLoader's and its sampler's generators seeded {value}"
    if key == "sampler":
        return f"a DataLoader whose sampler is a {value}"
    if key == "sampler_seed":
        return f"DistributedSampler(..., seed={value!r})"
    if key == "sampler_drop_last":
        return f"DistributedSampler(..., drop_last={value!r})"
    if key == "ranks":
        return (
            f"{value} ranks, or a checkpoint saved at an epoch's end; or a DataLoader whose "
            "sampler is torch's DistributedSampler itself, or the dataset itself given to fit "
            "with batch_size=..., which resume mid-epoch on any number of ranks"
        )
    if key in _DATA_FIT_NAMES:
        return f"{_DATA_ARGUMENTS[key]}={value!r}"
    return None


_DRIVER_KEYS = (
    "history",
    "window",
    "epoch_sums",
    "best",
    "member_bests",
    "empty_batches",
    "stop_reason",
    "early_stopping",
    "data",
    "source",
)


def _of_members(window: dict[str, Any]) -> bool | None:
    """Whether a saved window's sums are a stacked state's (its metrics' member columns beside
    their means, `functrain.core.stacked.member_columns`); None for an empty one."""
    keys = list(window.get("keys", ()))
    if not keys:
        return None
    return any(k.endswith("]") and k.rpartition("[")[0] in keys for k in keys)


def tree_problems(driver: Any, path: str = "driver") -> list[str]:
    """Everything keeping `driver` from being what `Ledger.to_tree` writes and `from_tree` reads.

    A loaded checkpoint's ``state.driver`` is checked with this before a run resumes from it, so
    that a malformed one is refused by the load, naming the path, instead of crashing `fit` later
    or resuming into another run's records.

    Example:
        >>> tree_problems({"empty_batches": -1, "epochs": 3})
        ["driver: unknown keys ['epochs'] (expected some of history, window, epoch_sums, best,
          member_bests, empty_batches, stop_reason, early_stopping, data, source)",
         'driver/empty_batches: expected an int >= 0, got int -1']
    """
    if not isinstance(driver, dict):
        return [f"{path}: expected a dict, got {_describe(driver)}"]
    problems = []
    unknown = sorted(set(driver) - set(_DRIVER_KEYS))
    if unknown:
        problems.append(
            f"{path}: unknown keys {unknown[:10]} (expected some of {', '.join(_DRIVER_KEYS)})"
        )
    problems += _history_problems(driver.get("history"), f"{path}/history")
    for name in ("window", "epoch_sums"):
        problems += _window_problems(driver.get(name), f"{path}/{name}")
    best = driver.get("best")
    if best is not None and not _is_row(best):
        problems.append(
            f"{path}/best: expected None or a dict of metric names to numbers, got "
            f"{_describe(best)}"
        )
    members = driver.get("member_bests")
    if members is not None and not (
        isinstance(members, list) and all(m is None or _is_row(m) for m in members)
    ):
        problems.append(
            f"{path}/member_bests: expected None or a list of each member's best evaluation (a "
            f"dict of metric names to numbers, or None), got {_describe(members)}"
        )
    if not _is_count(driver.get("empty_batches", 0)):
        problems.append(
            f"{path}/empty_batches: expected an int >= 0, got "
            f"{_describe(driver.get('empty_batches'))}"
        )
    if not isinstance(driver.get("stop_reason"), (str, type(None))):
        problems.append(
            f"{path}/stop_reason: expected None or a str, got "
            f"{_describe(driver.get('stop_reason'))}"
        )
    data = driver.get("data")
    if data is not None and not _is_row(data):
        problems.append(
            f"{path}/data: expected None or the data setup (a dict of names to numbers, str or "
            f"None), got {_describe(data)}"
        )
    counts = {k: data.get(k) for k in _SETUP_COUNTS} if isinstance(data, dict) else {}
    problems += [
        f"{path}/data/{key}: expected None or an int >= {_SETUP_COUNTS[key]}, got {_describe(n)}"
        for key, n in counts.items()
        if n is not None and not (_is_count(n) and n >= _SETUP_COUNTS[key])
    ]
    problems += source_problems(driver.get("source"), f"{path}/source")
    early = driver.get("early_stopping")
    if early is not None and not (
        isinstance(early, dict)
        and set(early) <= {"best", "bad_evals"}
        and isinstance(early.get("best"), (int, float, type(None)))
        and not isinstance(early.get("best"), bool)
        and _is_count(early.get("bad_evals", 0))
    ):
        problems.append(
            f"{path}/early_stopping: expected None or a dict with best (a number or None) and "
            f"bad_evals (an int >= 0), got {_describe(early)}"
        )
    return problems


# the counts of a data setup, and the least each may be
_SETUP_COUNTS = {"samples": 0, "batch_size": 1, "batches": 0, "ranks": 1}


def _window_problems(tree: Any, path: str) -> list[str]:
    """What keeps `tree` from being a `MetricWindow`'s saved sums (empty when it is one)."""
    if tree is None:
        return []
    if not isinstance(tree, dict) or not set(tree) <= {"keys", "sums", "count", "updates"}:
        return [f"{path}: expected a dict of keys, sums, count and updates, got {_describe(tree)}"]
    keys, sums, count = tree.get("keys", []), tree.get("sums"), tree.get("count", 0)
    updates = tree.get("updates", count)
    problems = []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        problems.append(f"{path}/keys: expected a list of metric names, got {_describe(keys)}")
    if _is_count(count) and not (_is_count(updates) and updates <= count):
        problems.append(
            f"{path}/updates: expected an int from 0 to count={count}, got {_describe(updates)}"
        )
    if not _is_count(count):
        problems.append(f"{path}/count: expected an int >= 0, got {_describe(count)}")
    elif count and not (
        isinstance(sums, torch.Tensor)
        and sums.dtype == torch.float64
        and list(sums.shape) == [len(keys)]
    ):
        problems.append(
            f"{path}/sums: expected a float64 tensor of shape [{len(keys)}] (one sum per key), got "
            f"{_describe(sums)}"
        )
    return problems


def _history_problems(history: Any, path: str) -> list[str]:
    if history is None:
        return []
    if not isinstance(history, dict) or not set(history) <= set(KINDS):
        return [f"{path}: expected a dict with some of {list(KINDS)}, got {_describe(history)}"]
    return [
        f"{path}/{kind}: expected a list of rows (dicts of names to numbers, str or None), got "
        f"{_describe(rows)}"
        for kind, rows in history.items()
        if not isinstance(rows, list) or not all(_is_row(r) for r in rows)
    ]


def _is_row(row: Any) -> bool:
    return isinstance(row, dict) and all(
        isinstance(k, str) and isinstance(v, _SCALARS) for k, v in row.items()
    )


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {value.dtype}"
    return f"{type(value).__name__} {str(value)[:80]}"


def position_problems(tree: Mapping[str, Any]) -> list[str]:
    """A saved `epoch_step` past the end of an epoch of the data setup in ``driver/data``."""
    driver = tree.get("driver")
    data = driver.get("data") if isinstance(driver, dict) else None
    batches, position = _epoch_batches(data), tree.get("epoch_step")
    if batches is None or not isinstance(position, torch.Tensor) or position.max() <= batches:
        return []
    return [
        f"epoch_step: expected at most {batches} (the batches of an epoch of the data setup in "
        f"driver/data), got {position.tolist()}"
    ]


def _epoch_batches(data: Any) -> int | None:
    """An epoch's batches of map-style data (an iterable's length is only what it says it is,
    and data whose ``set_epoch`` may change its length has none of its own)."""
    if _is_row(data) and data.get("epoch_sized") is True:
        return None
    samples, size = (data.get(k) for k in ("samples", "batch_size")) if _is_row(data) else (0, 0)
    if not (_is_count(samples) and _is_count(size) and size):
        return None
    sampler = data.get("sampler")
    if isinstance(sampler, str) and not sampler.startswith("torch.utils.data."):
        return None  # a sampler of the user's: its len() need not be what it yields
    if _is_count(data.get("batches")):
        return data["batches"]  # a DataLoader's, from its own sampler
    return samples // size if data.get("drop_last") else -(-samples // size)


register_driver_check(tree_problems)
register_state_check(position_problems)
register_driver_keys(_DRIVER_KEYS)
