"""The ``functrain`` command, ``functrain run CONFIG [override ...]`` or ``python -m functrain``.

It composes the config with the overrides (Hydra's grammar: ``key=value``, ``+key=value``,
``~key``), builds the run, trains it with `fit` (the resolved config saved with every checkpoint)
and prints how it ended. ``--print-config`` prints the resolved config and trains nothing. Exit
status: 0 when the run finished, 2 on a `ConfigError` (the message names the key), 1 on a
`FunctrainError` of another kind; stopped by a signal while it trains, the update under way ends,
the state is saved into ``fit.checkpoint_dir``, and the status is 130 for Ctrl-C (SIGINT), 143
for SIGTERM (a scheduler's stop), 138 for SIGUSR1 (SLURM's warning before the time limit: stop
to be requeued); then it says how to go on, "run the same command to resume" where the run
resumes (``fit.resume: true`` with a ``fit.checkpoint_dir``), else where its last checkpoint is,
or that there is none.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from functrain import distributed
from functrain.checkpoint.manager import CheckpointManager
from functrain.config.build import build_run
from functrain.config.compose import hydra_modules, load_config
from functrain.driver.fit import FitResult
from functrain.driver.preemption import Preempted, exit_status, stopped_how
from functrain.errors import ConfigError, FunctrainError

__all__ = ["main"]


# what `functrain run --help` says of a config file, after its description
TRUST = (
    "A config file is code: each _target_ names a Python class or function, and building the run "
    "calls it with the arguments beside it (as Hydra's instantiate does), so a config can do "
    "whatever the Python it names can. Run only configs you trust as you trust code. Trusted or "
    "not, a _target_ that runs code or processes, writes files or loads pickles (os, subprocess, "
    "pathlib, builtins.open, numpy.load, torch.load, ...) is refused, as is a method of an object "
    "the config built: a net for the known ways, not a sandbox. For a config from "
    "elsewhere, --safe builds only functrain's own public names (but those that read or write "
    "files at a path of their own), torch.nn, torch.optim and torch's datasets, samplers and "
    "tensor constructors, and refuses any other _target_ before anything is imported or called "
    "(add a module with --allow). Even so the run writes where the config says (checkpoint_dir, "
    "log_file, a logger's path)."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="functrain", description="Train a functrain run described by a config file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="build and train the run a YAML config describes",
        # the docstring's second paragraph, whole (argparse reflows it)
        description=" ".join(__doc__.split("\n\n")[1].split()),
        epilog=TRUST,
    )
    run.add_argument("config", type=Path, help="a .yaml file, e.g. configs/demo.yaml")
    run.add_argument(
        "overrides", nargs="*", help="Hydra overrides: key=value, +key=value (add), ~key (remove)"
    )
    run.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    run.add_argument(
        "--safe",
        action="store_true",
        help="for a config from elsewhere: refuse every _target_ outside functrain, torch.nn, "
        "torch.optim and torch's datasets and tensor constructors",
    )
    run.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE",
        help="with --safe: a module whose classes and functions it allows too (repeatable), e.g. "
        "torchvision.transforms",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``functrain`` command with `argv`; return its exit status.

    `argv` defaults to ``sys.argv[1:]``.
    """
    parser = _parser()
    args, rest = parser.parse_known_args(argv)  # overrides after a flag come back here
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    if args.allow and not args.safe:
        parser.error("--allow widens --safe: give --safe too")
    trust = {"safe": args.safe, "allow": args.allow}
    config = None
    try:
        config = load_config(args.config, args.overrides, **trust)
        if args.print_config:
            _, omegaconf = hydra_modules()
            print(omegaconf.OmegaConf.to_yaml(config), end="")
            return 0
        distributed.init_from_env()  # under torchrun: one process per rank
        result = build_run(config, **trust).fit()
    except ConfigError as e:
        print(f"functrain run: {e}", file=sys.stderr)
        return 2
    except FunctrainError as e:
        print(f"functrain run: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Preempted as stop:  # SIGTERM or SIGUSR1: fit saved the state in hand
        return _stopped(config, stop.signum)
    except KeyboardInterrupt:  # fit closed the run (callbacks, checkpoint manager) on its way out
        return _stopped(config, signal.SIGINT)
    if result.stop_reason == "interrupted":  # fit handed back what it trained: a script stops
        return _stopped(config, signal.SIGINT)
    if distributed.is_main_process():
        print(_summary(result))
    return 0


def _stopped(config: Mapping[str, Any] | None, signum: int) -> int:
    """Say how a run a signal stopped goes on; the shell's status for a command `signum` ended."""
    if distributed.is_main_process():
        print(f"functrain run: {_interrupted(config, signum)}", file=sys.stderr)
    return exit_status(signum)


def _interrupted(config: Mapping[str, Any] | None, signum: int = signal.SIGINT) -> str:
    """How a stopped run goes on: the same command where it resumes, else its last checkpoint.

    `config` is the resolved config (None: interrupted before it was composed); `signum` the
    signal that stopped it (SIGINT for a `KeyboardInterrupt`).
    """
    how = stopped_how(signum)
    if config is None:
        return f"{how} before the config was composed; nothing was trained"
    settings = config.get("fit") or {}
    directory = settings.get("checkpoint_dir") if isinstance(settings, Mapping) else None
    if not directory:
        return f"{how}; no checkpoint was saved (the config sets no fit.checkpoint_dir)"
    latest = (
        CheckpointManager(directory, readonly=True).latest() if Path(directory).is_dir() else None
    )
    if settings.get("resume"):
        where = f"from {latest}" if latest is not None else "no checkpoint yet: from the start"
        return f"{how}; run the same command to resume ({where})"
    if latest is None:
        return f"{how}; no checkpoint was saved in {directory}"
    return (
        f"{how}; the last checkpoint is {latest}: add ++fit.resume=true to the same command "
        "to continue from it"
    )


def _summary(result: FitResult) -> str:
    lines = [
        f"stopped: {result.stop_reason} after {int(result.state.step)} updates, "
        f"{int(result.state.epoch)} epochs"
    ]
    if result.checkpoints.get("best") is not None:
        lines.append(f"best checkpoint: {result.checkpoints['best']}")
    if result.checkpoints.get("latest") is not None:
        lines.append(f"latest checkpoint: {result.checkpoints['latest']}")
    for name, value in (result.best or {}).items():
        lines.append(
            f"best {name}: {value:.6g}" if isinstance(value, float) else f"best {name}: {value}"
        )
    for name, value in (result.test or {}).items():
        lines.append(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines)
