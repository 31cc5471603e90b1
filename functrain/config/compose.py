"""A config file and its command-line overrides, composed by Hydra into one resolved config.

`load_config` runs Hydra's compose API on a YAML file: its defaults list, then the overrides in
Hydra's own grammar (``key=value`` sets, ``+key=value`` adds, ``++key=value`` sets or adds,
``~key`` removes, ``group=option`` picks a config group's file), then OmegaConf resolves the
interpolations (``${lr}``). The result is plain dicts and lists: what `build_run` instantiates and
what `fit` saves with every checkpoint, so the saved config is exactly the one that was built.

Two resolvers for the arithmetic a run's numbers need (OmegaConf has none, on purpose):
``${ft.mul:a,b}`` and ``${ft.ceil_div:a,b}``, e.g. the steps of an epoch,
``${ft.ceil_div:${train_size},${batch_size}}``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from functrain.config.keys import override_typo
from functrain.config.limits import (
    bounded_yaml,
    interpolation_problem,
    text_problem,
    yaml_problem,
)
from functrain.config.targets import path_problem, paths_problems
from functrain.errors import ConfigError

__all__ = ["load_config", "hydra_modules", "register_resolvers", "one_line"]

INSTALL_HINT = "pip install 'functrain[config]'"


def hydra_modules() -> tuple[Any, Any]:
    """``(hydra, omegaconf)``, imported on first use (``import functrain`` never imports them)."""
    try:
        import hydra
        import hydra.utils  # noqa: F401
        import omegaconf
    except ImportError as e:
        raise ConfigError(
            f"runs from a config file need Hydra: {INSTALL_HINT} (got: {e})"
        ) from None
    register_resolvers()
    return hydra, omegaconf


def register_resolvers() -> None:
    """Register ``ft.mul`` and ``ft.ceil_div`` with OmegaConf.

    `load_config` does it; call it yourself before a ``@hydra.main`` app composes a config that
    uses them.

    Example:
        >>> from omegaconf import OmegaConf
        >>> register_resolvers()
        >>> cfg = {"steps": "${ft.ceil_div:1257,64}", "total": "${ft.mul:${steps},15}"}
        >>> OmegaConf.create(cfg).total
        300
    """
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ft.mul"):
        OmegaConf.register_new_resolver("ft.mul", lambda a, b: _numbers("ft.mul", a, b) and a * b)
    if not OmegaConf.has_resolver("ft.ceil_div"):
        OmegaConf.register_new_resolver(
            "ft.ceil_div",
            lambda a, b: (
                _numbers("ft.ceil_div", a, b)
                and (
                    math.ceil(a / b) if isinstance(a, float) or isinstance(b, float) else -(-a // b)
                )
            ),
        )


def _numbers(name: str, a: Any, b: Any) -> bool:
    """True where `a` and `b` are numbers; else a `ConfigError` (``'x' * 50000000`` is a string
    of 50 MB that a config of one line would ask for)."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b)):
        raise ConfigError(f"{name} takes two numbers, got {a!r} and {b!r}")
    return True


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    safe: bool = False,
    allow: Sequence[str] = (),
) -> dict[str, Any]:
    """Compose the YAML file at `path` with Hydra overrides, resolved into plain dicts and lists.

    Composing reads the file and imports nothing but, where an override names a key the config
    lacks under a ``_target_``, that target (to name the keys it takes).

    Args:
        path: a ``.yaml`` file; its folder is Hydra's config directory (config groups and the
            defaults list are looked up there).
        overrides: Hydra overrides, e.g. ``["fit.max_epochs=1", "+fit.save_every=10",
            "~data.test"]``.
        safe: for a config from elsewhere: import no target outside the packages safe mode
            allows, and refuse a config whose ``_target_`` paths it would refuse
            (`functrain.config.targets.path_problem`); `build_run` with ``safe=True`` checks
            what they name.
        allow: modules safe mode allows besides (as `build_run`'s).

    Returns:
        The resolved config.

    Raises:
        ConfigError: Hydra is not installed, the file is missing, not UTF-8 or not YAML (it, or a
            file of its config groups: named with the line), nests deeper than 32 levels or
            holds aliases that expand it by more than 10,000 values (`functrain.config.limits`),
            holds a tag that is not plain YAML (``!!python/object/apply``) or a number YAML 1.1
            reads otherwise than its digits (``010``, octal; ``1:30``, base 60); an override does
            not parse or names a key that is not there (close to one that is: the message says
            which; else ``+key=`` adds one), or an interpolation does not resolve; each names the
            key or override.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = f.write_text("lr: 0.1\\nsteps: 10\\nfit: {max_steps: '${steps}'}\\n")
        >>> load_config(f, ["steps=${ft.mul:2,3}", "+fit.log_every=2", "~lr"])
        {'steps': 6, 'fit': {'max_steps': 6, 'log_every': 2}}
    """
    hydra, omegaconf = hydra_modules()
    import yaml  # Hydra's own dependency

    file = Path(path)
    if file.suffix != ".yaml" or not file.is_file():
        raise ConfigError(
            f"expected a .yaml config file, got {str(file)!r}"
            + ("" if file.is_file() else " (no such file)")
        )
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(
            "overrides must be strings in Hydra's grammar (key=value, +key=value, ~key), got "
            f"{bad!r}"
        )
    unreadable = text_problem(file)
    if unreadable is not None:
        raise ConfigError(unreadable)
    with (
        hydra.initialize_config_dir(
            config_dir=str(file.parent.resolve()), version_base="1.3", job_name="functrain"
        ),
        bounded_yaml(),
    ):
        try:
            composed = hydra.compose(config_name=file.stem, overrides=list(overrides))
        except UnicodeDecodeError as e:  # a file of a config group or a defaults list
            raise ConfigError(
                f"cannot compose {str(file)!r}: a config file it reads (of a config group or a "
                f"defaults list) is not UTF-8 text ({e}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as e:  # PyYAML's, of any file it reads
            raise ConfigError(yaml_problem(e)) from None
        except (hydra.errors.HydraException, omegaconf.errors.OmegaConfBaseException) as e:
            importable = (lambda p: path_problem(p, allow) is None) if safe else None
            typo = _override_typo(e, overrides, importable)
            if typo is not None:
                raise ConfigError(typo) from None
            cause = f" ({one_line(e.__cause__)})" if e.__cause__ is not None else ""
            raise ConfigError(
                f"cannot compose {str(file)!r} with overrides {list(overrides)!r}: "
                f"{one_line(e)}{cause}"
            ) from None
    expanding = interpolation_problem(omegaconf.OmegaConf.to_container(composed, resolve=False))
    if expanding is not None:
        raise ConfigError(expanding)
    try:
        resolved = omegaconf.OmegaConf.to_container(composed, resolve=True)
    except omegaconf.errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(
            f"config key {dotted(key)}: cannot resolve its value: {one_line(e)}"
        ) from None
    refused = paths_problems(resolved, allow) if safe else []
    if refused:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(refused))
    return resolved


def dotted(key: str) -> str:
    """OmegaConf's ``callbacks[0].patience`` as the dotted ``callbacks.0.patience`` overrides use.

    Example:
        >>> dotted("callbacks[0].kwargs[12]")
        'callbacks.0.kwargs.12'
    """
    return re.sub(r"\[(\d+)\]", r".\1", key).lstrip(".")


def _override_typo(
    error: BaseException,
    overrides: Sequence[str],
    importable: Callable[[str], bool] | None = None,
) -> str | None:
    """functrain's message for an override that sets a key the config lacks, else None.

    Hydra's error leaves the key and the mapping that lacks it on its cause; the override is the
    first that sets that key (or a key under it) without ``+``, ``++`` or ``~``.
    """
    _, omegaconf = hydra_modules()
    cause = error.__cause__
    node = getattr(cause, "parent_node", None)
    full_key = getattr(cause, "full_key", None)
    if not (
        isinstance(cause, omegaconf.errors.ConfigKeyError | omegaconf.errors.ConfigAttributeError)
        and isinstance(node, omegaconf.DictConfig)
        and isinstance(full_key, str)
        and full_key
    ):
        return None
    key = dotted(full_key)
    override = next(
        (o for o in overrides if o.startswith(key) and o[len(key) : len(key) + 1] in ("=", ".")),
        None,
    )
    return None if override is None else override_typo(override, key, node, importable)


def one_line(error: BaseException) -> str:
    """`error`'s message on one line, without the lines of Hydra's and OmegaConf's that say
    where (``full_key:``, ``object_type=``); its type's name where it says nothing else."""
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and not line.strip().startswith(("full_key:", "object_type="))
    ]
    return " ".join(lines) or type(error).__name__
