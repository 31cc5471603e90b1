"""`WandbLogger`: a run's rows, config and checkpoints logged to Weights & Biases.

Needs ``pip install 'functrain[wandb]'``; `wandb` is imported when the logger is built, never by
``import functrain``. Every row is logged against the run's update count, ``trainer/step`` (a
metric the logger declares as the x-axis of its columns), so rows that a resumed run logs again
after its checkpoint draw over the interrupted run's instead of being dropped as steps going back.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from functrain.distributed import rank_and_world
from functrain.driver.callbacks import Callback, Run
from functrain.errors import ConfigError
from functrain.integrations.extras import require

__all__ = ["WandbLogger"]

STEP = "trainer/step"
EPOCH = "trainer/epoch"
PREFIXES = (
    "trainer",
    "train",
    "eval",
    "epoch",
    "checkpoint",
)  # the sections of the logger's columns


class WandbLogger(Callback):
    """Log train, eval and epoch rows, the run's config and its checkpoints to a W&B run.

    At each log interval the new train rows are logged (``train/loss``, ``train/lr``, ...), at each
    evaluation the eval row (``eval/val_loss``, ...), at each epoch end the epoch row
    (``epoch/loss``, the epoch's means), every row with ``trainer/step`` (updates) and
    ``trainer/epoch``. The config holds `fit`'s ``config=`` (the resolved file of ``functrain
    run``), `config` and, when training begins, `fit`'s settings (``fit``), the optimizer's name and
    the number of trainable parameters. Each checkpoint's path is logged as it is saved
    (``checkpoint/path`` in its step's row; ``checkpoint/latest`` and ``checkpoint/all`` in the
    summary).

    Under torch.distributed only rank 0 starts and logs a run; the other ranks' loggers do
    nothing. A run the logger started is finished when training ends, successfully
    (``exit_code=0``) or by an exception, Ctrl-C included (``exit_code=1``, after the rows logged
    before it).

    Args:
        config: the run's own configuration (hyperparameters, a resolved config file), logged as
            the W&B config.
        run: an existing W&B run to log into (from your own ``wandb.init``) instead of starting one.
        finish: finish the W&B run when training ends; None (default) finishes only a run the
            logger started, never one given as `run`.
        checkpoint_artifacts: also log each checkpoint as a version of the run's model artifact
            ``checkpoints-<run id>`` (aliases ``latest`` and ``step-<N>``), by reference to its
            files (``file://``: nothing is copied or uploaded; rotation by ``keep_last`` deletes
            the files older versions refer to).
        **init_kwargs: passed to ``wandb.init`` (``project``, ``name``, ``dir``, ``mode``,
            ``tags``, ``group``, ``resume``, ``id``, ...) when the run starts, i.e. when training
            begins on rank 0.

    Raises:
        ConfigError: wandb is not installed (naming the install line), `run` given together with
            ``wandb.init`` arguments, or a `config` that is not a mapping.

    Example:
        >>> import tempfile, torch, wandb, functrain as ft
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), loss_fn)
        >>> silent = wandb.Settings(silent=True)
        >>> offline = dict(mode="offline", dir=tempfile.mkdtemp(), settings=silent)
        >>> logger = ft.WandbLogger(config={"lr": 1e-2}, project="demo", **offline)
        >>> quiet = dict(progress=False, verbosity="silent")
        >>> result = ft.fit(state, data, max_epochs=2, log_every=2, callbacks=[logger], **quiet)
        >>> logger.logged
        {'train': 4, 'eval': 0, 'epoch': 2}
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        run: Any = None,
        finish: bool | None = None,
        checkpoint_artifacts: bool = False,
        **init_kwargs: Any,
    ) -> None:
        self._wandb = require("wandb", "WandbLogger")
        if run is not None and init_kwargs:
            raise ConfigError(
                f"WandbLogger got an existing run and wandb.init arguments {sorted(init_kwargs)}: "
                "the run is already started; pass either run= or the wandb.init arguments"
            )
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(
                "WandbLogger's config must be a mapping (a dict of settings), got "
                f"{type(config).__name__}: pass config={{...}}"
            )
        self.config = dict(config or {})
        self.init_kwargs = init_kwargs
        self.run = run
        self.finish = run is None if finish is None else finish
        self.checkpoint_artifacts = checkpoint_artifacts
        self.logged = {"train": 0, "eval": 0, "epoch": 0}  # rows logged in the last fit, per kind
        self.checkpoints: list[str] = []  # the paths of the checkpoints saved in the last fit
        self._seen: dict[str, int] | None = (
            None  # history rows already logged; None: not logging (rank > 0)
        )

    def on_train_begin(self, run: Run) -> None:
        rank = run.state.dist.rank if run.state.dist is not None else rank_and_world()[0]
        if rank != 0:
            return
        self.logged, self.checkpoints = {"train": 0, "eval": 0, "epoch": 0}, []
        # fit's `config` (the resolved config file of `functrain run`) first; the logger's own wins
        config = {**(run.options.checkpointing.config or {}), **self.config}
        if self.run is None:
            self.run = self._wandb.init(config=config, **self.init_kwargs)
        elif config:
            self.run.config.update(config, allow_val_change=True)
        self.run.config.update(_fit_config(run), allow_val_change=True)
        self.run.define_metric(STEP)
        for (
            prefix
        ) in PREFIXES:  # only these: a run the user gave may log other metrics on its own axis
            self.run.define_metric(f"{prefix}/*", step_metric=STEP)
        # a resumed run's history holds the rows logged before its checkpoint: log only new ones
        self._seen = {kind: len(rows) for kind, rows in run.history.rows.items()}

    def on_batch_end(self, run: Run) -> None:
        if run.logs is not None:
            self._log_new(run, "train")

    def on_eval_end(self, run: Run) -> None:
        self._log_new(run, "eval")

    def on_epoch_end(self, run: Run) -> None:
        self._log_new(run, "epoch")

    def on_save(self, run: Run) -> None:
        if self._seen is None or run.saved is None:
            return
        path = str(Path(run.saved).resolve())
        self.checkpoints.append(path)
        self.run.log({STEP: run.step, EPOCH: run.epoch, "checkpoint/path": path})
        self.run.summary["checkpoint/latest"] = path
        self.run.summary["checkpoint/all"] = list(self.checkpoints)
        if self.checkpoint_artifacts:
            self._log_artifact(run, Path(path))

    def _log_artifact(self, run: Run, path: Path) -> None:
        artifact = self._wandb.Artifact(
            f"checkpoints-{self.run.id}",
            type="model",
            metadata={"step": run.step, "epoch": run.epoch, "path": str(path)},
        )
        artifact.add_reference(
            path.as_uri(), name=path.name
        )  # referenced, not copied: W&B records each file's checksum
        self.run.log_artifact(artifact, aliases=["latest", f"step-{run.step}"])

    def on_train_end(self, run: Run) -> None:
        self._close(run, exit_code=0)

    def on_exception(self, run: Run) -> None:
        self._close(run, exit_code=1)

    def _log_new(self, run: Run, kind: str) -> None:
        if self._seen is None:
            return
        rows = run.history.rows[kind]
        for row in rows[self._seen[kind] :]:
            self.run.log(_row(kind, row))
            self.logged[kind] += 1
        self._seen[kind] = len(rows)

    def _close(self, run: Run, exit_code: int) -> None:
        if self._seen is None:
            return
        try:
            for kind in (
                "train",
                "eval",
                "epoch",
            ):  # the run's last, partial train row, or rows before an error
                self._log_new(run, kind)
        finally:
            self._seen = None
            if self.finish:
                self.run.finish(exit_code=exit_code)
                self.run = None  # another fit with this logger starts a new run


def _row(kind: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """A history row as W&B columns: its numbers under ``<kind>/``, its step and epoch as axes."""
    out: dict[str, Any] = {STEP: row["step"], EPOCH: row["epoch"]}
    for key, value in row.items():
        if (
            key not in ("step", "epoch")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            out[f"{kind}/{key}"] = value
    return out


def _fit_config(run: Run) -> dict[str, Any]:
    state = run.state
    trainable = sum(p.numel() for p in state.params.values())
    plain = {
        k: v for k, v in run.config.items() if k != "config"
    }  # fit's `config` is logged as the W&B config itself
    settings = {
        k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in plain.items()
    }
    return {"fit": settings, "optimizer": state.optimizer.name, "trainable_parameters": trainable}
